"""GGUF-quantized matrices on the CUDA backend: the block formats kernels/ decode, the record of
one matrix kept on the device exactly as the file stores it, and of a fused matrix whose parts
are stored in different formats.

A GGUF file stores a [rows, cols] matrix row by row, each row cols / block_values blocks of
block_bytes bytes (kernels/gguf_blocks.cuh spells out every layout). The backend uploads those
bytes unchanged, so device memory for weights is about the file's size, and its kernels
dequantize in registers (decode) or into a reused scratch buffer (prefill).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nanovllm.backends.kernel_library import GGUF_FORMATS
from nanovllm.errors import NanovllmError

Array = Any


@dataclass(slots=True)
class QuantizedWeight:
    """A [rows, cols] matrix (out_features, in_features) in a GGUF block format, on the device."""

    format: str  # the kernels' name of the block format, e.g. "q4_k"
    shape: tuple[int, int]
    data: Array  # uint8 [rows, row_bytes], contiguous: the file's blocks as they are

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


@dataclass(slots=True)
class FusedQuantizedWeight:
    """Rows of several matrices used as one (q/k/v, gate/up) whose parts have different types:
    Qwen2.5's Q4_K_M file stores attn_v as Q8_0 or Q6_K next to a Q5_0 attn_q. Each part is a
    QuantizedWeight or a dense array; linear() runs one matmul per part into its columns of the
    output."""

    parts: tuple[Any, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(int(p.nbytes) for p in self.parts)


def gguf_format(qtype: Any) -> str:
    """The format name of a gguf.GGMLQuantizationType (or its name, e.g. "Q4_K")."""
    name = str(getattr(qtype, "name", qtype)).lower()
    if name not in GGUF_FORMATS:
        supported = ", ".join(f.upper() for f in GGUF_FORMATS)
        raise NanovllmError(
            f"the CUDA backend has no kernels for GGUF type {name.upper()}; it keeps {supported} "
            "quantized, other types must be dequantized at load"
        )
    return name


def row_bytes(format: str, cols: int) -> int:
    """Bytes of one row of `cols` values; cols must be a whole number of blocks."""
    values, size = GGUF_FORMATS[format]
    if cols <= 0 or cols % values:
        raise NanovllmError(
            f"a {format.upper()} row holds whole blocks of {values} values; {cols} columns do not"
        )
    return cols // values * size
