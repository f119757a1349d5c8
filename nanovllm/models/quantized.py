"""Weight matrices kept as their file stores them: GGUF quantized blocks or 16-bit floats.

A `QuantizedTensor` is one [rows, cols] matrix (rows = output features, HF order) whose rows are
the file's bytes: `data[r]` holds row r's GGUF blocks (or its F16/BF16/F32 values) exactly as
written, and may be a view into the memory-mapped file. Backends decide what to do with it: the
reference backend dequantizes it to float32 at load, the compiled CPU backend runs matmul
kernels on the blocks directly.

Row operations are all a model needs: llama.cpp's Q/K un-permute is a row permutation, fused
q/k/v and gate/up weights are row concatenations, and tensor parallelism shards rows. A fused
weight whose parts have different types (Qwen2.5's Q4_K_M file stores attn_v as Q8_0 next to a
Q5_0 attn_q) stays quantized as a `FusedWeight` of parts, each run by its own kernel into its
slice of the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import gguf
import numpy as np

from nanovllm.errors import ModelLoadError

Q = gguf.GGMLQuantizationType

# Each checked against an independent reference in tests/test_gguf.py.
DEQUANTIZABLE = frozenset(
    Q[name] for name in "F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K Q4_K Q5_K Q6_K".split()
)
FLOAT_TYPES = {Q.F32: np.dtype(np.float32), Q.F16: np.dtype(np.float16)}

_CHUNK_VALUES = 1 << 22  # values dequantized per step


def row_bytes(qtype: Q, cols: int) -> int:
    """Bytes of one row of `cols` values in this type; cols must be whole blocks."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if cols % block:
        raise ModelLoadError(f"a {qtype.name} row holds whole blocks of {block}, not {cols} values")
    return cols // block * size


@dataclass(slots=True, frozen=True)
class QuantizedTensor:
    """A [rows, cols] weight matrix in its stored type; `data` is uint8 [rows, row_bytes]."""

    qtype: Q
    shape: tuple[int, int]
    data: np.ndarray

    def __post_init__(self) -> None:
        rows, cols = self.shape
        expected = (rows, row_bytes(self.qtype, cols))
        if self.data.dtype != np.uint8 or self.data.shape != expected:
            raise ModelLoadError(
                f"{self.qtype.name} tensor of shape {self.shape} needs uint8 data {expected}, "
                f"got {self.data.dtype} {self.data.shape}"
            )

    @classmethod
    def from_array(cls, array: np.ndarray) -> QuantizedTensor:
        """A float32 or float16 matrix as stored (its bytes, not a copy where it is contiguous)."""
        dtype = np.dtype(array.dtype)
        qtype = next((q for q, d in FLOAT_TYPES.items() if d == dtype), None)
        if qtype is None or array.ndim != 2:
            raise ModelLoadError(f"cannot keep a {dtype} array of shape {array.shape} as stored")
        data = np.ascontiguousarray(array).view(np.uint8)
        return cls(qtype, (int(array.shape[0]), int(array.shape[1])), data)

    @classmethod
    def bfloat16(cls, bits: np.ndarray) -> QuantizedTensor:
        """A bfloat16 matrix given as its uint16 bit patterns."""
        data = np.ascontiguousarray(bits, dtype=np.uint16).view(np.uint8)
        return cls(Q.BF16, (int(bits.shape[0]), int(bits.shape[1])), data)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols], computed by the `gguf` package (the reference for every kernel)."""
        return dequantize(self.data, self.qtype, self.shape)

    def take_rows(self, index: np.ndarray | slice) -> QuantizedTensor:
        """The rows picked by `index` (a slice stays a view; an index array copies)."""
        data = self.data[index]
        return QuantizedTensor(self.qtype, (int(data.shape[0]), self.shape[1]), data)


@dataclass(slots=True, frozen=True)
class FusedWeight:
    """Rows of several weights stacked in order, as parts of different types (never two adjacent
    parts of one type: `concat_rows` merges those)."""

    parts: tuple[QuantizedTensor, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def dequantize(self) -> np.ndarray:
        return np.concatenate([p.dequantize() for p in self.parts])


Weight = QuantizedTensor | FusedWeight


def concat_rows(tensors: Sequence[QuantizedTensor]) -> QuantizedTensor | FusedWeight:
    """Stack the rows of matrices with one column count: one QuantizedTensor where all share a
    type, else a FusedWeight whose parts are the runs of equal type."""
    if len({t.shape[1] for t in tensors}) != 1:
        raise ModelLoadError(f"cannot fuse matrices of shapes {[t.shape for t in tensors]}")
    runs: list[list[QuantizedTensor]] = []
    for tensor in tensors:
        if runs and runs[-1][0].qtype == tensor.qtype:
            runs[-1].append(tensor)
        else:
            runs.append([tensor])
    parts = tuple(_join(run) for run in runs)
    return parts[0] if len(parts) == 1 else FusedWeight(parts)


def stack_rows(tensors: Sequence[np.ndarray | QuantizedTensor]) -> np.ndarray | Weight:
    """Fuse weights for one matmul: float arrays by concatenation, stored matrices by
    `concat_rows` (a float array among them is kept as stored too)."""
    if all(isinstance(t, np.ndarray) for t in tensors):
        return np.concatenate(tensors)
    return concat_rows(
        [t if isinstance(t, QuantizedTensor) else QuantizedTensor.from_array(t) for t in tensors]
    )


def dequantize_weight(weight: np.ndarray | Weight) -> np.ndarray:
    """Any weight as a float32 array (a float32 array is returned as it is)."""
    if isinstance(weight, QuantizedTensor | FusedWeight):
        return weight.dequantize()
    return np.asarray(weight, dtype=np.float32)


def dequantize(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    """A tensor's raw GGUF blocks (one row of blocks per tensor row) as a float32 array of `shape`
    (row-major, HF order) that the caller owns."""
    if qtype not in DEQUANTIZABLE:
        raise ModelLoadError(
            f"nanovllm cannot dequantize {qtype.name}; supported: {supported_names()}"
        )
    out = np.empty(shape, dtype=np.float32)
    rows_in = raw.reshape(raw.shape[0] if raw.ndim > 1 else 1, -1)
    rows_out = out.reshape(len(rows_in), -1)
    # A few rows at a time: the dequantizer's scratch arrays are several times its output, which
    # for a large embedding matrix would otherwise cost gigabytes at once.
    step = max(1, _CHUNK_VALUES // max(1, rows_out.shape[1]))
    for start in range(0, len(rows_in), step):
        rows_out[start : start + step] = gguf.quants.dequantize(
            rows_in[start : start + step], qtype
        )
    return out


def supported_names() -> str:
    return ", ".join(q.name for q in sorted(DEQUANTIZABLE))


def _join(run: list[QuantizedTensor]) -> QuantizedTensor:
    if len(run) == 1:
        return run[0]
    data = np.concatenate([t.data for t in run])
    return QuantizedTensor(run[0].qtype, (int(data.shape[0]), run[0].shape[1]), data)
