"""The compiled CPU kernels (nanovllm/backends/cpu*.py) against their oracles: the `gguf` package's
dequantization, bit for bit, for every stored format; NumPy matmuls on those values for batches of
1 to 64 rows (the decode kernel and the tiled BLAS path); and the reference backend's ops
(nanovllm/backends/cpu_reference.py) for attention, norms, rotary, SiLU and the KV write.

Shapes are small and deliberately uneven: 37 weight rows split over chunks of 5, batch rows that
are not multiples of the kernels' 4-row blocking, tiles that do not divide the matrix.
"""

from __future__ import annotations

import threading

import gguf
import numba
import numpy as np
import pytest
from _gguf_reference import HALF_FIELDS, random_blocks, random_matrix_bytes

from nanovllm.backends import cpu as cpu_backend
from nanovllm.backends.base import AttentionMetadata
from nanovllm.backends.cpu import CPUBackend
from nanovllm.backends.cpu_jit import ThreadControl, cache_location
from nanovllm.backends.cpu_quant import FORMATS
from nanovllm.backends.cpu_reference import ReferenceBackend
from nanovllm.models.quantized import QuantizedTensor, concat_rows

Q = gguf.GGMLQuantizationType
KERNEL_FORMATS = sorted(FORMATS, key=lambda q: q.name)
ROWS = 37


def stored(name: str, rows: int, cols: int, seed: int = 0) -> QuantizedTensor:
    data = random_matrix_bytes(np.random.default_rng(seed), name, rows, cols)
    return QuantizedTensor(Q[name], (rows, cols), data)


def gguf_values(t: QuantizedTensor) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.qtype).reshape(t.shape).astype(np.float32)


def columns(qtype: Q) -> int:
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return 2 * block if block > 1 else 96  # two blocks; float rows of any width


@pytest.fixture(scope="module")
def backend() -> CPUBackend:
    return CPUBackend(num_threads=2)


@pytest.fixture(scope="module")
def q8_backend() -> CPUBackend:
    return CPUBackend(num_threads=2, quantization="q8-activations")


@pytest.fixture(scope="module")
def reference() -> ReferenceBackend:
    return ReferenceBackend()


# ---- stored formats ---------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", KERNEL_FORMATS, ids=lambda q: q.name)
def test_embedding_rows_equal_gguf_dequantization_bit_for_bit(backend, qtype):
    weight = stored(qtype.name, ROWS, columns(qtype))
    ids = np.array([0, 36, 5, 5, 17])
    got = backend.embedding(ids, backend.weight(weight))
    np.testing.assert_array_equal(got.view(np.uint32), gguf_values(weight)[ids].view(np.uint32))


@pytest.mark.parametrize("mode", ["auto", "q8-activations"])
@pytest.mark.parametrize("qtype", KERNEL_FORMATS, ids=lambda q: q.name)
def test_linear_equals_numpy_on_dequantized_weights(backend, q8_backend, qtype, mode, monkeypatch):
    # A tile of 300 values: the batched path dequantizes the 37 rows in several uneven tiles.
    monkeypatch.setattr(cpu_backend, "TILE_VALUES", 300)
    backend = q8_backend if mode == "q8-activations" else backend
    cols = columns(qtype)
    weight = stored(qtype.name, ROWS, cols)
    prepared = backend.weight(weight)
    values = gguf_values(weight).astype(np.float64)
    rng = np.random.default_rng(1)
    for rows in (1, 2, 3, 8, 17, 64, 80):  # 80: the tiled path
        x = rng.normal(size=(rows, cols)).astype(np.float32)
        seen = activations_as_read(backend, qtype, x)
        want = seen.astype(np.float64) @ values.T
        got = backend.linear(x, prepared)
        scale = np.abs(seen).astype(np.float64) @ np.abs(values).T  # a bound on float32 rounding
        assert np.all(np.abs(got - want) <= 1e-5 * scale + 1e-6), (qtype.name, rows)


def activations_as_read(backend: CPUBackend, qtype: Q, x: np.ndarray) -> np.ndarray:
    """x as the backend's matmul reads it: for a weight with integer kernels, one or two rows
    rounded to 16-bit codes, or with q8-activations every decode batch rounded to Q8_0 blocks
    by the `gguf` package (llama.cpp's activations); other rows and formats as they are."""
    integer_rows = cpu_backend.MAX_INTEGER_ROWS[backend.activations]
    if len(x) > integer_rows or FORMATS[qtype].integer is None:
        return x
    if backend.activations.bits == 8:
        return gguf.quants.dequantize(gguf.quants.quantize(x, Q.Q8_0), Q.Q8_0).reshape(x.shape)
    return int16_blocks(x)


def int16_blocks(x: np.ndarray) -> np.ndarray:
    """x rounded to blocks of 32 16-bit codes with a float32 scale max|x| / 32767, halves away
    from zero (gguf's rounding), back in float32."""
    blocks = x.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(32767)
    with np.errstate(divide="ignore"):
        inverse = np.where(d == 0, np.float32(0), np.float32(1) / d)
    return (gguf.quants.np_roundf(blocks * inverse) * d).astype(np.float32).reshape(x.shape)


@pytest.mark.parametrize("mode", ["auto", "q8-activations"])
def test_a_fused_weight_of_mixed_types_runs_each_part_into_its_columns(backend, q8_backend, mode):
    backend = q8_backend if mode == "q8-activations" else backend
    q, k, v = stored("Q5_0", 20, 64, 0), stored("Q5_0", 6, 64, 1), stored("Q8_0", 6, 64, 2)
    prepared = backend.weight(concat_rows([q, k, v]))
    assert [p.kernels for p in prepared.parts] == [FORMATS[Q.Q5_0], FORMATS[Q.Q8_0]]
    assert [p.format for p in prepared.parts] == ["q5_0", "q8_0"]
    assert prepared.nbytes == q.nbytes + k.nbytes + v.nbytes  # nothing became float32
    values = np.concatenate([gguf_values(t) for t in (q, k, v)])
    x = np.random.default_rng(3).normal(size=(3, 64)).astype(np.float32)
    bias = np.arange(32, dtype=np.float32)
    seen = activations_as_read(backend, Q.Q8_0, x)  # both types read the same rows
    np.testing.assert_allclose(
        backend.linear(x, prepared, bias), seen @ values.T + bias, rtol=1e-5, atol=1e-5
    )


def test_float_weights_and_formats_without_a_kernel_become_float32_rows(backend):
    dense = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
    assert backend.weight(dense).parts[0].kernels is FORMATS[Q.F32]
    # No kernel for Q3_K: random valid blocks (finite scales), so a widening that lost or mixed
    # up rows would not match gguf's values.
    _, block_bytes, halves = HALF_FIELDS["Q3_K"]
    blocks = random_blocks(np.random.default_rng(1), 4, block_bytes, halves).reshape(4, 110)
    q3 = QuantizedTensor(Q.Q3_K, (4, 256), blocks)
    part = backend.weight(q3).parts[0]
    assert part.kernels is FORMATS[Q.F32] and part.data.dtype == np.float32
    want = gguf_values(q3)
    assert np.abs(want).max() > 0 and len({row.tobytes() for row in want}) == 4
    np.testing.assert_array_equal(part.data, want)


# ---- ops against the reference backend --------------------------------------------------------
def _views(rng, tokens, heads, kv_heads, head_dim):
    """q, k, v as the model makes them: strided views into one fused qkv output."""
    qkv = rng.normal(size=(tokens, (heads + 2 * kv_heads) * head_dim)).astype(np.float32)
    q = qkv[:, : heads * head_dim].reshape(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].reshape(tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].reshape(tokens, kv_heads, head_dim)
    return q, k, v


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_the_reference(backend, reference, with_residual):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 70)).astype(np.float32)
    residual = rng.normal(size=(5, 70)).astype(np.float32) if with_residual else None
    weight = rng.normal(size=70).astype(np.float32)
    got, got_res = backend.rms_norm(x, weight, 1e-5, residual)
    want, want_res = reference.rms_norm(x, weight, 1e-5, residual)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_res, want_res, rtol=1e-6, atol=1e-6)


def test_rms_norm_of_per_head_views_matches_the_reference(backend, reference):
    q, _, _ = _views(np.random.default_rng(0), 3, 4, 2, 8)  # Qwen3's q_norm on strided heads
    weight = np.linspace(0.5, 1.5, 8, dtype=np.float32)
    np.testing.assert_allclose(
        backend.rms_norm(q, weight, 1e-6)[0],
        reference.rms_norm(q, weight, 1e-6)[0],
        rtol=1e-5,
        atol=1e-6,
    )


def test_rotary_of_strided_views_matches_the_reference(backend, reference):
    rng = np.random.default_rng(0)
    q, k, _ = _views(rng, 5, 6, 2, 16)
    positions = np.array([0, 3, 9, 10, 31])
    table = rng.normal(size=(32, 16)).astype(np.float32)
    for got, want in zip(
        backend.rotary(q, k, positions, table),
        reference.rotary(q, k, positions, table),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_silu_and_mul_matches_the_reference(backend, reference):
    x = np.random.default_rng(0).normal(scale=4, size=(3, 2 * 33)).astype(np.float32)
    np.testing.assert_allclose(
        backend.silu_and_mul(x), reference.silu_and_mul(x), rtol=1e-5, atol=1e-6
    )


def test_write_kv_from_strided_views_matches_the_reference(backend, reference):
    rng = np.random.default_rng(0)
    _, k, v = _views(rng, 4, 4, 2, 8)
    slots = np.array([5, 0, 17, 30])
    caches = {
        name: [np.zeros((8, 4, 2, 8), np.float32) for _ in range(2)] for name in ("ours", "ref")
    }
    backend.write_kv(k, v, *caches["ours"], slots)
    reference.write_kv(k, v, *caches["ref"], slots)
    for ours, ref in zip(caches["ours"], caches["ref"], strict=True):
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_attention_matches_the_reference_for_a_mixed_batch(backend, reference, block_size):
    """Decodes, a prefill chunk after cached tokens and a fresh prefill longer than the kernel
    takes (MAX_KERNEL_QUERIES) in one step, with GQA
    and block tables that are not in order."""
    rng = np.random.default_rng(block_size)
    heads, kv_heads, head_dim = 6, 2, 16
    query_lens, context_lens = [1, 5, 1, 21, 1], [23, 12, 1, 21, 40]  # 21: the BLAS path
    tables = []
    free = list(rng.permutation(128))
    for length in context_lens:
        tables.append([free.pop() for _ in range(-(-length // block_size))])
    width = max(map(len, tables))
    block_tables = np.zeros((len(tables), width), np.int32)
    for row, table in enumerate(tables):
        block_tables[row, : len(table)] = table
    k_cache = rng.normal(size=(128, block_size, kv_heads, head_dim)).astype(np.float32)
    v_cache = rng.normal(size=(128, block_size, kv_heads, head_dim)).astype(np.float32)
    q = rng.normal(size=(sum(query_lens), heads, head_dim)).astype(np.float32)
    query_start = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
    meta = AttentionMetadata(
        slot_mapping=np.zeros(len(q), np.int64), block_tables=block_tables,
        query_start=query_start, context_lens=np.array(context_lens, np.int32),
        block_size=block_size, query_start_host=query_start,
        context_lens_host=np.array(context_lens, np.int32), block_tables_host=block_tables,
    )  # fmt: skip
    got = backend.paged_attention(q, k_cache, v_cache, meta, 0.25)
    want = reference.paged_attention(q, k_cache, v_cache, meta, 0.25)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---- threads and the compile cache -----------------------------------------------------------
def test_the_thread_count_applies_in_every_thread_that_runs_an_op():
    control = ThreadControl(1)
    seen = []

    def engine_thread():
        control.apply()
        seen.append(numba.get_num_threads())

    worker = threading.Thread(target=engine_thread)
    worker.start()
    worker.join()
    assert control.num_threads == 1 and seen == [1]


def test_more_threads_than_numbas_pool_are_capped_with_a_warning():
    with pytest.warns(UserWarning, match="numba's pool has"):
        control = ThreadControl(10_000)
    assert control.num_threads == numba.config.NUMBA_NUM_THREADS


def test_compiled_kernels_are_cached_next_to_the_source_or_in_a_writable_directory(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path / "cache"))
    package = tmp_path / "site-packages"
    assert cache_location(package, writable=lambda path: True) is None  # numba's own choice
    read_only = cache_location(package, writable=lambda path: path != package)
    assert read_only == tmp_path / "cache" / "numba" and read_only.is_dir()
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_location(package, writable=lambda path: False) is None  # numba reads it
