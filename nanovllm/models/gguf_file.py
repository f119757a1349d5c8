"""A GGUF file's header read straight from its memory map: the metadata as Python values and
the tensor index, nothing else.

gguf's own `GGUFReader` keeps several NumPy views per array element; for a 151,936-token
vocabulary with as many merges that is about half a gigabyte while it parses (Qwen2.5-Coder-0.5B:
peak RSS 572 MB to read a 491 MB file's header) and a fragmented heap afterwards. This reads the
same layout (gguf-py's `GGUFReader`, llama.cpp's gguf.cpp) into plain lists. The tests compare it
with `GGUFReader` field by field and tensor by tensor.

Layout, little-endian: magic "GGUF", version (u32, 2 or 3), tensor count (u64), metadata count
(u64); each metadata entry is a key (string), a value type (u32) and its value (a string is a
u64 length and UTF-8 bytes; an array is an element type (u32), a count (u64) and the elements);
each tensor entry is a name, a dimension count (u32), the dimensions (u64 each, innermost first),
a type (u32) and an offset (u64) from the data section, which starts at the next multiple of
`general.alignment` (default 32) after the index.
"""

from __future__ import annotations

import mmap
import struct
from typing import Any, NamedTuple

import gguf
import numpy as np

V = gguf.GGUFValueType
_SCALARS = {
    V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
    V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d",
}  # fmt: skip


class TensorInfo(NamedTuple):
    """What gguf's ReaderTensor says of a tensor, its bytes as a uint8 view into the map."""

    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # innermost first, as the file lists them
    n_bytes: int
    data_offset: int  # from the start of the file
    data: np.ndarray


class _Cursor:
    def __init__(self, buffer: mmap.mmap) -> None:
        self.buffer, self.pos = buffer, 0

    def scalar(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buffer, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        size = self.scalar("<Q")
        text = self.buffer[self.pos : self.pos + size].decode("utf-8")
        self.pos += size
        return text

    def value(self, kind: int) -> Any:
        kind = V(kind)
        if kind == V.STRING:
            return self.string()
        if kind == V.ARRAY:
            element, count = V(self.scalar("<I")), self.scalar("<Q")
            if element in _SCALARS:  # numbers in one read
                dtype = np.dtype(_SCALARS[element])
                values = np.frombuffer(self.buffer, dtype, count, self.pos)
                self.pos += count * dtype.itemsize
                return values.tolist()
            return [self.value(element) for _ in range(count)]
        return self.scalar(_SCALARS[kind])


def read_header(file_map: mmap.mmap) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """(metadata by key, tensors by GGUF name) of a mapped GGUF file. Raises ValueError (or
    struct.error, IndexError, KeyError) on a malformed header."""
    cursor = _Cursor(file_map)
    if file_map[:4] != b"GGUF":
        raise ValueError("not a GGUF file (no GGUF magic)")
    cursor.pos = 4
    version = cursor.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
    num_tensors, num_fields = cursor.scalar("<Q"), cursor.scalar("<Q")
    meta = {}
    for _ in range(num_fields):
        key = cursor.string()
        meta[key] = cursor.value(cursor.scalar("<I"))
    entries = []
    for _ in range(num_tensors):
        name = cursor.string()
        dims = tuple(cursor.scalar("<Q") for _ in range(cursor.scalar("<I")))
        entries.append((name, dims, gguf.GGMLQuantizationType(cursor.scalar("<I")), cursor.scalar("<Q")))  # fmt: skip
    alignment = int(meta.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    start = -(-cursor.pos // alignment) * alignment
    tensors = {}
    for name, dims, qtype, offset in entries:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(dims, dtype=np.int64)) // block * type_size
        position = start + offset
        if position + n_bytes > len(file_map):
            raise ValueError(f"tensor {name} runs past the end of the file")
        data = np.frombuffer(file_map, np.uint8, n_bytes, position)
        tensors[name] = TensorInfo(name, qtype, dims, n_bytes, position, data)
    return meta, tensors
