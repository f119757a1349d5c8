"""The decode matmul kernels (dense and GGUF-quantized) and the GGUF dequantize kernel on the CUDA
emulator, through the CUDA backend's own launch code, against NumPy and the `gguf` package.

Row counts M are those of decode steps: 1, 2, 3, 5, 8, 16 and 33 (the kernel's tile holds 4 rows
of x and 8 of the weight, so these are one tile, partial tiles and many tiles); K and N are not
multiples of any tile. Every case runs under the emulator's three thread schedules, and each
kernel once under AddressSanitizer. Dequantized values must equal the `gguf` package's bit for
bit; matmuls must be within about two units in the last place of the output dtype.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from conftest import assert_matches

from nanovllm.backends import cuda
from nanovllm.backends.cuda import CUDABackend
from nanovllm.backends.kernel_cases import DTYPES, compare
from nanovllm.backends.kernel_library import GGUF_FORMATS
from nanovllm.backends.matmul_cases import (
    QTYPES,
    case_matmul,
    case_quantized_matmul,
    dequantize_exactly,
    dequantized,
    matmul_checks,
    random_blocks,
)
from nanovllm.backends.quantized import FusedQuantizedWeight, QuantizedWeight
from nanovllm.errors import NanovllmError
from nanovllm.models.quantized import QuantizedTensor, concat_rows

SCHEDULES = ("forward", "reverse", "random")
GGUF_DTYPES = ("float32", "float16")
FORMATS = tuple(GGUF_FORMATS)
Q3_K = gguf.GGMLQuantizationType.Q3_K


def in_features_for(fmt: str) -> int:
    """Not a multiple of any sweep of the warps over K: 65 blocks of 32 (two warps per row pair,
    lanes loop), or 136 sub-blocks of the K-quants (four warps per row pair, lanes loop)."""
    return 65 * 32 if GGUF_FORMATS[fmt][0] == 32 else 17 * 256


# ---- dense --------------------------------------------------------------------------------
# K sets how many warps share a pair of weight rows (kernel_library.matmul_geometry): 1 below
# 64 units of 8 values, 2 below 128, else 4.
DENSE_SHAPES = {
    "k200_16_byte_loads": dict(in_features=200),
    "k520_two_warps_per_row_pair": dict(in_features=520, out_features=9),
    "k1032_four_warps_per_row_pair": dict(in_features=1032, out_features=7),
    "k37_element_loads": dict(in_features=37, out_features=11),
    "k264_misaligned_x": dict(in_features=264, x_offset=1),
    "k8_n1_no_bias": dict(in_features=8, out_features=1, bias=False),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", DENSE_SHAPES)
def test_dense_matmul_matches_reference(emulated, shape, dtype, schedule) -> None:
    results = case_matmul(
        emulated(schedule), dtype, np.random.default_rng(1), **DENSE_SHAPES[shape]
    )
    assert_matches(results, dtype)


def test_dense_matmul_under_asan(emulated) -> None:
    for shape in ("k200_16_byte_loads", "k37_element_loads"):
        kwargs = DENSE_SHAPES[shape]
        results = case_matmul(
            emulated("asan"), "float16", np.random.default_rng(2), (1, 5), **kwargs
        )
        assert_matches(results, "float16")


# ---- GGUF matmul ---------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", GGUF_DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_gguf_matmul_matches_reference(emulated, fmt, dtype, schedule) -> None:
    rng = np.random.default_rng(3)
    results = case_quantized_matmul(
        emulated(schedule), dtype, rng, fmt, in_features=in_features_for(fmt)
    )
    assert_matches(results, dtype)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gguf_matmul_under_asan(emulated, fmt) -> None:
    rng = np.random.default_rng(4)
    results = case_quantized_matmul(
        emulated("asan"), "float16", rng, fmt, rows=(5,), out_features=9, in_features=256
    )
    assert_matches(results, "float16")


def test_16_byte_loads_only_from_aligned_arrays(monkeypatch) -> None:
    """A misaligned 16-byte load faults on a GPU (on the emulator g++ may make it an aligned SSE
    load that kills the process, or may not), so the glue's choice is checked on the launch
    arguments: the dense kernel is told to read element by element (vec = 0), the GGUF kernel,
    which always reads 16 bytes, gets an aligned copy of x."""
    backend = CUDABackend("float32", emulated=True)
    launches = []
    function = backend.kernels.function

    def spy(family, name):
        fn = function(family, name)

        def launch(grid, block, args, shared_mem=0):
            launches.append((name, args[1].ctypes.data % 16, int(args[-2])))
            fn(grid, block, args, shared_mem=shared_mem)

        return launch

    monkeypatch.setattr(backend.kernels, "function", spy)
    rng = np.random.default_rng(5)
    for offset in (0, 1):
        assert_matches(case_matmul(backend, "float32", rng, (3,), x_offset=offset), "float32")
        results = case_quantized_matmul(backend, "float32", rng, "q8_0", (3,), x_offset=offset)
        assert_matches(results, "float32")
    # (kernel, x address mod 16, the argument before out_stride: vec for the dense kernel,
    # split for GGUF)
    assert launches == [
        ("matmul_f32", 0, 1), ("matmul_q8_0_f32", 0, 1),
        ("matmul_f32", 4, 0), ("matmul_q8_0_f32", 0, 1),
    ]  # fmt: skip


# ---- GGUF dequantize -----------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", GGUF_DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_is_bit_exact_with_the_gguf_package(emulated, fmt, dtype, schedule) -> None:
    rng = np.random.default_rng(6)
    for what, got, want in dequantize_exactly(emulated(schedule), dtype, rng, fmt):
        assert got.dtype == want.dtype, what
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), f"{fmt} {what}"


def test_dequantize_under_asan(emulated) -> None:
    for fmt in FORMATS:
        rng = np.random.default_rng(7)
        for what, got, want in dequantize_exactly(emulated("asan"), "float16", rng, fmt, 5, 256):
            assert np.array_equal(got, want), f"{fmt} {what}"


def test_quantized_embedding_gives_table_rows_and_zeros_for_ids_out_of_range(emulated) -> None:
    backend = emulated("forward")
    blocks = random_blocks("q8_0", 6, 64, np.random.default_rng(8))
    table = backend.quantized_weight(QTYPES["q8_0"], (6, 64), blocks)
    ids = np.array([[5, 0], [6, -1]], dtype=np.int64)
    rows = backend.to_numpy(backend.embedding(backend.asarray(ids), table))
    assert rows.shape == (2, 2, 64) and rows.dtype == np.float32
    assert np.array_equal(rows[0], dequantized("q8_0", blocks)[[5, 0]])
    assert not rows[1].any()


# ---- linear(): which path, and how the bias rounds ------------------------------------------
def test_linear_runs_few_rows_on_the_kernel_and_many_on_cublas(emulated, monkeypatch) -> None:
    backend = CUDABackend("float32", emulated=True)
    calls = []
    monkeypatch.setattr(backend, "matmul_kernel", lambda *a: calls.append("kernel") or a[0][:, :3])
    monkeypatch.setattr(backend, "_cublas_linear", lambda *a: calls.append("cublas") or a[0][:, :3])
    dense = np.ones((3, 8), np.float32)
    blocks = random_blocks("q4_0", 3, 32, np.random.default_rng(9))
    quantized = backend.quantized_weight(QTYPES["q4_0"], (3, 32), blocks)
    for m, weight in ((8, dense), (9, dense), (16, quantized), (17, quantized)):
        backend.linear(np.ones((m, weight.shape[1]), np.float32), weight)
    assert calls == ["kernel", "cublas", "kernel", "cublas"]


def test_linear_under_graph_capture_never_calls_cublas(emulated, monkeypatch) -> None:
    backend = emulated("forward")

    def refuse(*args):
        raise NotImplementedError("calling cuBLAS API during stream capture is unsupported")

    monkeypatch.setattr(backend, "_capturing", lambda: True)
    monkeypatch.setattr(backend, "_cublas_linear", refuse)
    rng = np.random.default_rng(10)
    x, weight = rng.standard_normal((33, 64), np.float32), rng.standard_normal((5, 64), np.float32)
    blocks = random_blocks("q6_k", 5, 256, rng)
    quantized = backend.quantized_weight(QTYPES["q6_k"], (5, 256), blocks)
    x_q = rng.standard_normal((33, 256), np.float32)
    assert np.allclose(backend.linear(x, weight), x @ weight.T, atol=1e-4)
    want = x_q @ dequantized("q6_k", blocks).T
    assert np.allclose(backend.linear(x_q, quantized), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["q4_1", "q5_k"])
def test_linear_on_many_rows_dequantizes_to_scratch_then_multiplies(emulated, fmt, monkeypatch):
    """Past the kernel's row limit a GGUF matmul is dequantize + cuBLAS; a matrix larger than
    the scratch budget goes a slice of rows at a time, all through one reused buffer."""
    backend = CUDABackend("float16", emulated=True)
    rng = np.random.default_rng(11)
    cols = 256
    blocks = random_blocks(fmt, 21, cols, rng)
    weight = backend.quantized_weight(QTYPES[fmt], (21, cols), blocks)
    bias = rng.standard_normal(21).astype(np.float16)
    x = (rng.standard_normal((40, cols)) * 0.3).astype(np.float16)
    want = x.astype(np.float64) @ dequantized(fmt, blocks).astype(np.float64).T + bias
    whole = backend.linear(x, weight, bias)
    monkeypatch.setattr(cuda, "DEQUANTIZE_SCRATCH_BYTES", 8 * cols * 2)  # 8 rows at a time
    sliced = backend.linear(x, weight, bias)
    for out in (whole, sliced):
        assert out.dtype == np.float16 and out.shape == (40, 21)
        assert np.allclose(out, want, rtol=4e-3, atol=4e-3)
    assert backend._scratch.nbytes == 21 * cols * 2  # grown once for the whole matrix, reused


def test_bias_rounds_as_on_a_gpu_on_each_path(emulated) -> None:
    """Our kernel adds the bias to the float32 sum and rounds once; cuBLAS rounds its product to
    float16 and CuPy then adds the bias in float16. Here x @ w.T = 1 + 2^-11 + 2^-13 and the bias
    is -2^-13: the kernel gets 1 + 2^-11, a tie that rounds to even (1.0); cuBLAS first rounds up
    to 1 + 2^-10, which the bias does not bring back down."""
    backend = CUDABackend("float16", emulated=True)
    x = np.array([[1.0, 2.0**-11 + 2.0**-13]], dtype=np.float16)
    weight = np.ones((1, 2), dtype=np.float16)
    bias = np.array([-(2.0**-13)], dtype=np.float16)
    assert backend.linear(x, weight, bias)[0, 0] == 1.0  # one row: the kernel
    assert backend._cublas_linear(x, weight, bias)[0, 0] == np.float16(1 + 2.0**-10)


# ---- backend.weight(): matrices as the loader hands them -----------------------------------
def stored(fmt: str, rows: int, cols: int, seed: int) -> QuantizedTensor:
    blocks = random_blocks(fmt, rows, cols, np.random.default_rng(seed))
    return QuantizedTensor(QTYPES[fmt], (rows, cols), blocks)


def test_gguf_blocks_are_uploaded_as_they_are_and_other_types_become_dense(emulated) -> None:
    backend = CUDABackend("float16", emulated=True)
    q4k = stored("q4_k", 3, 256, 20)
    kept = backend.weight(q4k)
    assert isinstance(kept, QuantizedWeight) and kept.format == "q4_k"
    assert np.array_equal(kept.data, q4k.data) and kept.nbytes == q4k.nbytes  # the file's bytes
    half = np.random.default_rng(21).standard_normal((3, 8)).astype(np.float16)
    dense = backend.weight(QuantizedTensor.from_array(half))
    assert dense.dtype == np.float16 and np.array_equal(dense, half)
    q3k = QuantizedTensor(
        Q3_K, (2, 256), np.random.default_rng(22).integers(0, 256, (2, 110), np.uint8)
    )
    no_kernel = backend.weight(q3k)  # no kernels for Q3_K: dequantized at load
    assert no_kernel.dtype == np.float16
    assert np.array_equal(no_kernel, q3k.dequantize().astype(np.float16))


def test_quantization_none_dequantizes_every_matrix_at_load() -> None:
    backend = CUDABackend("float16", emulated=True, quantization="none")
    q8 = stored("q8_0", 4, 64, 23)
    dense = backend.weight(q8)
    assert isinstance(dense, np.ndarray) and dense.dtype == np.float16
    assert np.array_equal(dense, dequantized("q8_0", q8.data).astype(np.float16))
    with pytest.raises(NanovllmError, match="quantization must be one of auto, none"):
        CUDABackend("float16", emulated=True, quantization="gguf4")


@pytest.mark.parametrize("rows", [3, 40])  # the kernel into column slices; cuBLAS, copied in
def test_a_fused_weight_of_mixed_types_runs_each_part_into_its_columns(rows) -> None:
    """Qwen2.5's Q4_K_M mix: q and k in Q5_0, v in Q8_0, fused into one qkv matmul."""
    backend = CUDABackend("float32", emulated=True)
    q, k, v = stored("q5_0", 9, 96, 24), stored("q5_0", 3, 96, 25), stored("q8_0", 3, 96, 26)
    fused = backend.weight(concat_rows([q, k, v]))
    assert isinstance(fused, FusedQuantizedWeight) and fused.shape == (15, 96)
    assert [p.format for p in fused.parts] == ["q5_0", "q8_0"]
    rng = np.random.default_rng(27)
    x = rng.standard_normal((rows, 96)).astype(np.float32)
    bias = rng.standard_normal(15).astype(np.float32)
    weight = np.concatenate([p.dequantize() for p in (q, k, v)]).astype(np.float64)
    want = x.astype(np.float64) @ weight.T + bias
    got = backend.linear(x, fused, bias)
    assert got.shape == (rows, 15)
    assert np.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_the_kernel_writes_only_its_columns_of_a_wider_output() -> None:
    backend = CUDABackend("float32", emulated=True)
    rng = np.random.default_rng(28)
    x, weight = rng.standard_normal((5, 40), np.float32), rng.standard_normal((6, 40), np.float32)
    out = np.full((5, 10), -7.0, np.float32)
    backend.matmul_kernel(x, weight, None, out=out[:, 2:8])
    assert np.allclose(out[:, 2:8], x @ weight.T, atol=1e-4)
    assert (out[:, :2] == -7).all() and (out[:, 8:] == -7).all()
    with pytest.raises(NanovllmError, match="matmul output must be"):
        backend.matmul_kernel(x, weight, None, out=out[:, :5])


# ---- bad input ----------------------------------------------------------------------------
def test_quantized_weight_refuses_other_types_and_wrong_shapes(emulated) -> None:
    backend = emulated("forward")
    blocks = random_blocks("q4_0", 2, 64, np.random.default_rng(12))
    with pytest.raises(NanovllmError, match="no kernels for GGUF type Q2_K"):
        backend.quantized_weight("Q2_K", (2, 64), blocks)
    with pytest.raises(NanovllmError, match=r"uint8 \(2, 36\), got uint8 \(2, 18\)"):
        backend.quantized_weight(QTYPES["q4_0"], (2, 64), blocks[:, :18])
    with pytest.raises(NanovllmError, match="whole blocks of 32 values; 48 columns"):
        backend.quantized_weight(QTYPES["q4_0"], (2, 48), blocks)


def test_linear_refuses_mismatched_features(emulated) -> None:
    backend = emulated("forward")
    with pytest.raises(NanovllmError, match="input has 7 features, the weight"):
        backend.linear(np.ones((1, 7), np.float32), np.ones((3, 8), np.float32))


def test_check_cases_cover_every_kernel_and_path_and_pass(emulated) -> None:
    checks = matmul_checks(emulated("forward"), ["float32"])
    per_format = [
        f"{op} {fmt.upper()} float32" for fmt in FORMATS for op in ("matmul", "linear", "embedding")
    ]
    fused = f"linear fused {FORMATS[0].upper()}+{FORMATS[1].upper()} float32"
    assert [name for name, _, _ in checks] == [
        "matmul float32", "linear float32", "embedding float32", *per_format, fused
    ]  # fmt: skip
    for name, dtype, case in checks:
        ok, worst = compare(*case(np.random.default_rng(13)), dtype)
        assert ok, f"{name}: {worst:.2f} x tolerance"


def test_the_self_check_takes_only_the_formats_in_use(emulated) -> None:
    checks = matmul_checks(emulated("forward"), ["float16"], ["dense", "q6_k"])
    assert [name for name, _, _ in checks] == [
        "matmul float16", "linear float16", "embedding float16",
        "matmul Q6_K float16", "linear Q6_K float16", "embedding Q6_K float16",
    ]  # fmt: skip
