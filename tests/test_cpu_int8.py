"""The integer dot products of the cpu backend's decode matmuls (nanovllm/backends/cpu_int8.py):
activation rows rounded to blocks of codes — Q8_0 bit for bit as `gguf.quants.quantize` makes
them, or 16-bit codes with a float32 scale — and each weight row's dot products with them equal
to float64 products of both sides' values (the weights dequantized by `gguf`), for every format
with an integer kernel, on each code path the CPU may take (512-bit VNNI, 256-bit VNNI, no
VNNI), with block counts that are odd (the 512-bit loop's last block) and activation row counts
that are not multiples of 4."""

from __future__ import annotations

import gguf
import numba
import numpy as np
import pytest
from _gguf_reference import random_matrix_bytes
from test_cpu_kernels import int16_blocks

from nanovllm.backends import cpu_int8
from nanovllm.backends.cpu_int8 import LAYOUTS, Q8, Q16, QuantizedRows, kernels_for

Q = gguf.GGMLQuantizationType
FORMATS = sorted(LAYOUTS, key=lambda q: q.name)
PRECISIONS = pytest.mark.parametrize("precision", [Q8, Q16], ids=["q8", "q16"])


def gguf_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8, scales float32) of x's Q8_0 blocks, from the gguf package."""
    blocks = gguf.quants.quantize(x, Q.Q8_0).reshape(len(x), -1, 34)
    codes = blocks[:, :, 2:].copy().view(np.int8).reshape(x.shape)
    return codes, blocks[:, :, :2].copy().view(np.float16).astype(np.float32)[:, :, 0]


def as_read(x: np.ndarray, precision) -> np.ndarray:
    if precision is Q16:
        return int16_blocks(x)
    return gguf.quants.dequantize(gguf.quants.quantize(x, Q.Q8_0), Q.Q8_0).reshape(x.shape)


def awkward_rows() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(5, 160)) * rng.uniform(0.01, 100, size=(5, 1))).astype(np.float32)
    x[1, 32:64] = 0  # an all-zero block: scale 0, codes 0
    x[2, :32] = np.arange(32) - 15.5  # many codes near x.5
    x[3, :32] = 0
    x[3, 0], x[3, 1], x[3, 2] = 127, 2.5, -2.5  # Q8_0's d = 1: halves away from zero (3, -3)
    return x


def test_q8_rows_are_gguf_q8_0_blocks_bit_for_bit():
    x = awkward_rows()
    got = QuantizedRows(x, Q8)
    codes, scales = gguf_q8_0(x)
    np.testing.assert_array_equal(got.codes, codes)
    assert got.codes[3, 1] == 3 and got.codes[3, 2] == -3
    lanes = np.repeat(scales[:, :, None], 8, 2)
    np.testing.assert_array_equal(got.scales.view(np.uint32), lanes.view(np.uint32))
    halves = codes.reshape(5, -1, 2, 16).astype(np.int64).sum(-1)  # per 16 codes: Q6_K's scales
    np.testing.assert_array_equal(got.sums[:, :, [0, 4]], -halves)
    assert not got.sums[:, :, [1, 2, 3, 5, 6, 7]].any()


def test_q16_rows_are_16_bit_codes_of_a_float32_scale():
    x = awkward_rows()
    got = QuantizedRows(x, Q16)
    assert got.codes.dtype == np.int16 and got.scales.shape == (5, 5, 1)  # one scale a block
    values = got.codes.reshape(5, -1, 32) * got.scales[:, :, :1]
    np.testing.assert_array_equal(values.reshape(x.shape), int16_blocks(x))
    assert np.abs(got.codes).max() == 32767  # each nonzero block's largest value
    assert np.abs(values.reshape(x.shape) - x).max() <= np.abs(x).max() / 32767


@PRECISIONS
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_matmul_equals_float64_products_of_both_sides_values(qtype, precision):
    rng = np.random.default_rng(1)
    for cols in (256, 768) if qtype.name.endswith("K") else (32, 96, 320):  # 1, 3 and 10 blocks
        data = random_matrix_bytes(rng, qtype.name, 37, cols)
        data.flags.writeable = False  # as the memory map's rows are
        weights = gguf.quants.dequantize(data, qtype).reshape(37, cols).astype(np.float64)
        for rows in (1, 2, 3, 4, 8, 17):
            x = rng.normal(size=(rows, cols)).astype(np.float32)
            seen = as_read(x, precision).astype(np.float64)
            out = np.full((rows, 40), np.nan, np.float32)
            QuantizedRows(x, precision).matmul(kernels_for(qtype), data, out, 2, 5)
            want = seen @ weights.T
            bound = np.abs(seen) @ np.abs(weights).T  # float32 rounding of the scaled sums
            assert np.all(np.abs(out[:, 2:39] - want) <= 2e-6 * bound + 1e-6), (cols, rows)
            assert np.isnan(out[:, :2]).all() and np.isnan(out[:, 39]).all()  # its columns only


def _runner(qtype: Q, precision, rows: int, width: int):
    """A loop over weight rows calling the row dot product built for `width` (0: no VNNI)."""
    dot = cpu_int8._row_dot(LAYOUTS[qtype], precision, rows, width)

    @numba.njit
    def run(data, x, k, out):
        for n in range(data.shape[0]):
            row = data.ctypes.data + n * data.strides[0]
            result = dot(row, x.ctypes.data, k // 32, k)
            if rows == 1:
                out[0, n] = result
            else:
                for m in range(rows):
                    out[m, n] = result[m]

    return run


@pytest.mark.parametrize("width", [0, 1, 2], ids=["widening", "vnni256", "vnni512"])
@PRECISIONS
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_every_code_path_computes_the_same_products(qtype, precision, width):
    if width and cpu_int8.VNNI < width:
        pytest.skip("this CPU has no VNNI instructions of that width")
    rng = np.random.default_rng(2)
    cols = 512 if qtype.name.endswith("K") else 96
    data = random_matrix_bytes(rng, qtype.name, 11, cols)
    weights = gguf.quants.dequantize(data, qtype).reshape(11, cols).astype(np.float64)
    for rows in (1, 4):
        x = rng.normal(size=(rows, cols)).astype(np.float32)
        out = np.zeros((rows, 11), np.float32)
        _runner(qtype, precision, rows, width)(data, QuantizedRows(x, precision).packed, cols, out)
        seen = as_read(x, precision).astype(np.float64)
        bound = np.abs(seen) @ np.abs(weights).T
        assert np.all(np.abs(out - seen @ weights.T) <= 2e-6 * bound + 1e-6), rows


def test_the_code_path_follows_the_cpu_numba_compiles_for(monkeypatch):
    monkeypatch.setattr(cpu_int8.config, "CPU_FEATURES", "+avx2,+avx512vnni,+avx512vl,+avx512bw")
    assert cpu_int8.vector_blocks() == 2
    monkeypatch.setattr(cpu_int8.config, "CPU_FEATURES", "+avx2,+avxvnni,-avx512vnni")
    assert cpu_int8.vector_blocks() == 1
    monkeypatch.setattr(cpu_int8.config, "CPU_FEATURES", "+avx2,+fma")
    assert cpu_int8.vector_blocks() == 0
    monkeypatch.setattr(cpu_int8.config, "CPU_FEATURES", "")
    monkeypatch.setattr(cpu_int8.config, "CPU_NAME", "generic")
    assert cpu_int8.vector_blocks() == 0


@PRECISIONS
def test_a_nan_or_infinite_activation_makes_its_rows_outputs_nan(precision):
    """As float32 arithmetic would: the engine's non-finite check must still see it."""
    rng = np.random.default_rng(3)
    data = random_matrix_bytes(rng, "Q4_1", 7, 64)
    x = rng.normal(size=(5, 64)).astype(np.float32)
    x[1, 40], x[3, 2] = np.nan, np.inf
    out = np.zeros((5, 7), np.float32)
    QuantizedRows(x, precision).matmul(kernels_for(Q.Q4_1), data, out, 0, 2)
    assert np.isnan(out[[1, 3]]).all() and np.isfinite(out[[0, 2, 4]]).all()
