"""Read Hugging Face safetensors checkpoints (single file or sharded) from a memory map.

We parse the (tiny) safetensors header ourselves and memory-map the data because the
`safetensors` package's NumPy API cannot return bfloat16, which NumPy lacks. Tensors are produced
one at a time from the memory map, so loading never holds a second copy of the whole file:
F16/BF16 matrices as `QuantizedTensor`s that still point into the file (the backend decides
whether they stay 16-bit), everything else as float32 arrays (BF16 vectors widened from their
raw bits).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from nanovllm.errors import ModelLoadError
from nanovllm.models.quantized import QuantizedTensor

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {exc}") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights found in {folder}")
    for file in files:
        if not file.exists():
            raise ModelLoadError(f"shard {file.name} listed in the index is missing from {folder}")
    return files


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray | QuantizedTensor]]:
    """Yield (name, weight) for every tensor of every file: 16-bit matrices as stored, the rest
    as float32 arrays."""
    for file in files:
        header, data = _open(file)
        for name, info in header.items():
            yield name, _tensor(file, name, info, data)
        del data


def count_safetensors(files: list[Path]) -> int:
    """How many tensors iter_safetensors yields (the headers only are read)."""
    return sum(len(_open(file)[0]) for file in files)


def _open(file: Path) -> tuple[dict, np.memmap]:
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{file} is not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise ModelLoadError(
                f"{file} is truncated or corrupt: header of {header_len} bytes in a {size}-byte file"
            )
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            raise ModelLoadError(f"{file} has a corrupt safetensors header") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if end > data_size:
        raise ModelLoadError(
            f"{file} is truncated: its header describes {end} bytes of tensor data but the file holds {data_size}"
        )
    data = np.memmap(
        file, dtype=np.uint8, mode="r", offset=8 + header_len, shape=(max(data_size, 1),)
    )
    return header, data


def _tensor(file: Path, name: str, info: dict, data: np.memmap) -> np.ndarray | QuantizedTensor:
    dtype = _DTYPES.get(info["dtype"])
    if dtype is None:
        raise ModelLoadError(f"tensor {name} in {file.name} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    raw = data[begin:end].view(dtype).reshape(info["shape"])
    if raw.ndim == 2 and info["dtype"] == "F16":
        return QuantizedTensor.from_array(raw)
    if raw.ndim == 2 and info["dtype"] == "BF16":
        return QuantizedTensor.bfloat16(raw)
    if info["dtype"] == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)
