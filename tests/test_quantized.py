"""Weights kept as stored (nanovllm/models/quantized.py): row operations on GGUF blocks give the
rows the `gguf` package dequantizes, fused groups of mixed types stay quantized, and the loaders
hand out matrices in their file's form."""

from __future__ import annotations

import json
import struct

import gguf
import numpy as np
import pytest
from _gguf_reference import random_matrix_bytes

from nanovllm.errors import ModelLoadError
from nanovllm.models.quantized import (
    FusedWeight,
    QuantizedTensor,
    concat_rows,
    stack_rows,
)
from nanovllm.models.safetensors_loader import iter_safetensors

Q = gguf.GGMLQuantizationType


def matrix(name: str, rows: int, cols: int, seed: int = 0) -> QuantizedTensor:
    data = random_matrix_bytes(np.random.default_rng(seed), name, rows, cols)
    return QuantizedTensor(Q[name], (rows, cols), data)


def oracle(t: QuantizedTensor) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.qtype).reshape(t.shape).astype(np.float32)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "BF16"])
def test_take_rows_is_the_permutation_of_the_dequantized_rows(name):
    weight = matrix(name, 12, 512)
    order = np.random.default_rng(1).permutation(12)
    np.testing.assert_array_equal(weight.take_rows(order).dequantize(), oracle(weight)[order])
    np.testing.assert_array_equal(weight.take_rows(slice(3, 7)).dequantize(), oracle(weight)[3:7])


def test_rows_of_one_type_fuse_into_one_tensor():
    parts = [matrix("Q5_0", rows, 64, seed) for seed, rows in enumerate((8, 4, 4))]
    fused = concat_rows(parts)
    assert isinstance(fused, QuantizedTensor) and fused.qtype == Q.Q5_0
    np.testing.assert_array_equal(fused.dequantize(), np.concatenate([oracle(p) for p in parts]))


def test_rows_of_mixed_types_stay_quantized_as_parts():
    # Qwen2.5's Q4_K_M mix: attn_q and attn_k Q5_0, attn_v Q8_0
    q, k, v = matrix("Q5_0", 8, 64, 0), matrix("Q5_0", 4, 64, 1), matrix("Q8_0", 4, 64, 2)
    fused = concat_rows([q, k, v])
    assert isinstance(fused, FusedWeight)
    assert [(p.qtype, p.shape) for p in fused.parts] == [(Q.Q5_0, (12, 64)), (Q.Q8_0, (4, 64))]
    assert fused.shape == (16, 64) and fused.nbytes == q.nbytes + k.nbytes + v.nbytes
    np.testing.assert_array_equal(
        fused.dequantize(), np.concatenate([oracle(q), oracle(k), oracle(v)])
    )


def test_float_arrays_fuse_by_concatenation_and_join_stored_parts_as_stored():
    a, b = np.ones((2, 32), np.float32), np.zeros((3, 32), np.float32)
    np.testing.assert_array_equal(stack_rows([a, b]), np.concatenate([a, b]))
    mixed = stack_rows([matrix("Q8_0", 2, 32), a])
    assert [p.qtype for p in mixed.parts] == [Q.Q8_0, Q.F32]


def test_rows_of_different_widths_do_not_fuse():
    with pytest.raises(ModelLoadError, match="cannot fuse"):
        concat_rows([matrix("Q8_0", 2, 32), matrix("Q8_0", 2, 64)])


def test_data_must_be_whole_rows_of_blocks():
    with pytest.raises(ModelLoadError, match="uint8 data"):
        QuantizedTensor(Q.Q4_0, (2, 64), np.zeros((2, 35), np.uint8))
    with pytest.raises(ModelLoadError, match="whole blocks"):
        QuantizedTensor(Q.Q4_K, (2, 100), np.zeros((2, 56), np.uint8))


def _write_safetensors(path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    header, blobs, offset = {}, [], 0
    for name, (dtype, array) in tensors.items():
        raw = array.tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_safetensors_16_bit_matrices_come_as_stored_and_vectors_as_float32(tmp_path):
    rng = np.random.default_rng(0)
    half = rng.normal(size=(3, 8)).astype(np.float16)
    bf16_bits = (rng.normal(size=(2, 8)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    norm_bits = np.array([0x3F80, 0x4000], dtype=np.uint16)  # 1.0, 2.0
    _write_safetensors(
        tmp_path / "model.safetensors",
        {"h": ("F16", half), "b": ("BF16", bf16_bits), "n": ("BF16", norm_bits)},
    )
    got = dict(iter_safetensors([tmp_path / "model.safetensors"]))
    assert got["h"].qtype == Q.F16 and got["h"].shape == (3, 8)
    np.testing.assert_array_equal(got["h"].dequantize(), half.astype(np.float32))
    assert got["b"].qtype == Q.BF16
    np.testing.assert_array_equal(
        got["b"].dequantize(), (bf16_bits.astype(np.uint32) << 16).view(np.float32)
    )
    np.testing.assert_array_equal(got["n"], np.array([1.0, 2.0], np.float32))
