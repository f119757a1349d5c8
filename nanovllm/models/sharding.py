"""How a model is split across T tensor-parallel ranks (Megatron-LM's layout), tensor by tensor.

- Column-parallel (a rank holds a slice of the output rows, its output is a slice of the
  activations): q, k, v (by heads, biases too), gate and up (dense MLPs, every expert, the shared
  expert).
- Row-parallel (a slice of the input columns; the ranks' outputs are partial sums that one
  all-reduce adds): o_proj and down (dense MLPs, every expert, the shared expert). An MLP's down
  and a mixture's experts and shared expert are summed by the same single all-reduce.
- Vocabulary-parallel: the embedding and the LM head, in shards of ceil(V / T) rows (the last
  zero-padded). A token outside a rank's shard embeds to zeros before the all-reduce; the shards'
  logits are gathered along the vocabulary and the padding dropped.
- Replicated: norms, q/k norms, the MoE router, the shared expert's gate.

KV heads: with T <= Hkv each rank holds Hkv / T of them. With T > Hkv (T a multiple of Hkv)
each KV head is replicated on T / Hkv ranks, next to the query heads that read it, as vLLM does.

A rank runs the family's own model class on `local_config` (its share of heads and widths), so
the model code is the same at every T; `ParallelRank` is what it adds: the slicing at load, the
embedding, the gathered logits and the communicator (nanovllm/distributed/communicator.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from nanovllm.errors import NanovllmError
from nanovllm.models.model_config import ModelConfig
from nanovllm.models.quantized import QuantizedTensor, row_bytes

if TYPE_CHECKING:
    from nanovllm.distributed.communicator import Communicator

Array = Any
Tensor = np.ndarray | QuantizedTensor
_COLUMN_PARALLEL = ("gate_proj", "up_proj", "w1", "w3")  # the last name before .weight
_ROW_PARALLEL = ("down_proj", "w2")
_VOCABULARY = ("model.embed_tokens.weight", "lm_head.weight")


def check_tensor_parallel(config: ModelConfig, size: int) -> None:
    """Refuse a tensor-parallel size the model's heads and widths cannot be split into."""
    heads, kv = config.num_heads, config.num_kv_heads
    problems = []
    if heads % size:
        problems.append(f"{heads} attention heads")
    if (size > kv and size % kv) or (size <= kv and kv % size):
        problems.append(f"{kv} KV heads (T must divide them, or be a multiple of them)")
    widths = {"intermediate_size": config.intermediate_size}
    if config.num_experts:
        widths = {"moe_intermediate_size": config.moe_intermediate_size}
        if config.dense_layers:
            widths["intermediate_size"] = config.intermediate_size
        if config.shared_expert_intermediate_size:
            widths["shared_expert_intermediate_size"] = config.shared_expert_intermediate_size
    problems += [f"{name} {value}" for name, value in widths.items() if value % size]
    if problems:
        raise NanovllmError(
            f"--tensor-parallel-size {size} cannot split this model: {', '.join(problems)} "
            f"{'is' if len(problems) == 1 else 'are'} not divisible by {size}"
        )


def vocab_shard(vocab_size: int, size: int) -> int:
    return -(-vocab_size // size)


def local_config(config: ModelConfig, size: int) -> ModelConfig:
    """A rank's view of the model: its share of heads and widths, its vocabulary shard."""
    return dataclasses.replace(
        config,
        num_heads=config.num_heads // size,
        num_kv_heads=max(1, config.num_kv_heads // size),
        intermediate_size=config.intermediate_size // size,
        moe_intermediate_size=config.moe_intermediate_size // size,
        shared_expert_intermediate_size=config.shared_expert_intermediate_size // size,
        vocab_size=vocab_shard(config.vocab_size, size),
    )


@dataclass(slots=True)
class ParallelRank:
    """Rank `rank` of `size`: which slice of each checkpoint tensor it holds, and the collectives
    that join the slices."""

    rank: int
    size: int
    comm: Communicator
    config: ModelConfig  # the whole model's, as the checkpoint was written

    def shard(self, name: str, tensor: Tensor) -> Tensor:
        """This rank's part of the checkpoint tensor `name` (Hugging Face names, after a family's
        own renaming); a stored matrix (nanovllm/models/quantized.py) stays stored."""
        cfg, kind = self.config, name.rsplit(".", 2)
        projection = kind[-2] if len(kind) == 3 else ""
        if name in _VOCABULARY:
            return self._vocabulary_rows(tensor)
        if projection == "q_proj":
            return self._rows(tensor, self._heads(cfg.num_heads), cfg.head_dim)
        if projection in ("k_proj", "v_proj"):
            return self._rows(tensor, self._kv_heads(), cfg.head_dim)
        if projection == "o_proj":
            return self._columns(tensor, self._heads(cfg.num_heads), cfg.head_dim)
        if projection in _COLUMN_PARALLEL:
            return self._rows(tensor, self._heads(tensor.shape[0]), 1)
        if projection in _ROW_PARALLEL:
            return self._columns(tensor, self._heads(tensor.shape[1]), 1)
        return tensor

    def embed(self, backend: Any, ids: Array, table: Array) -> Array:
        """The embedding of `ids` from this rank's vocabulary shard, summed over the ranks."""
        xp, rows = backend.xp, self.vocab_rows
        local = ids - self.rank * rows
        inside = (local >= 0) & (local < rows)
        found = backend.embedding(xp.where(inside, local, 0), table)
        return self.comm.all_reduce(found * inside[:, None].astype(found.dtype))

    def gather_logits(self, backend: Any, logits: Array) -> Array:
        """[R, shard] logits of this rank -> [R, V] of the whole vocabulary."""
        joined = self.comm.all_gather(logits)
        return backend.xp.ascontiguousarray(joined[:, : self.config.vocab_size])

    @property
    def vocab_rows(self) -> int:
        return vocab_shard(self.config.vocab_size, self.size)

    # ---- slices --------------------------------------------------------------------------------
    def _heads(self, count: int) -> range:
        """This rank's even share of `count` units (heads, or rows of an MLP width)."""
        per = count // self.size
        return range(self.rank * per, (self.rank + 1) * per)

    def _kv_heads(self) -> range:
        kv = self.config.num_kv_heads
        if self.size <= kv:
            return self._heads(kv)
        head = self.rank // (self.size // kv)  # replicated on size / kv consecutive ranks
        return range(head, head + 1)

    @staticmethod
    def _rows(tensor: Tensor, units: range, unit: int) -> Tensor:
        rows = slice(units.start * unit, units.stop * unit)
        if isinstance(tensor, QuantizedTensor):  # as stored: whole rows of blocks
            return tensor.take_rows(rows)
        return np.ascontiguousarray(tensor[rows])

    @staticmethod
    def _columns(tensor: Tensor, units: range, unit: int) -> Tensor:
        start, stop = units.start * unit, units.stop * unit
        if isinstance(tensor, QuantizedTensor):
            return _stored_columns(tensor, start, stop)
        return np.ascontiguousarray(tensor[:, start:stop])

    def _vocabulary_rows(self, tensor: Tensor) -> Tensor:
        rows = self.vocab_rows
        part = self._rows(tensor, range(self.rank, self.rank + 1), rows)
        if part.shape[0] == rows:
            return part
        if isinstance(part, QuantizedTensor):  # zero bytes are zero values in every format
            data = np.zeros((rows, part.data.shape[1]), dtype=np.uint8)
            data[: part.shape[0]] = part.data
            return QuantizedTensor(part.qtype, (rows, part.shape[1]), data)
        padded = np.zeros((rows, *tensor.shape[1:]), dtype=tensor.dtype)
        padded[: len(part)] = part
        return padded


def _stored_columns(tensor: QuantizedTensor, start: int, stop: int) -> Tensor:
    """Columns start..stop of a stored matrix: still stored when they are whole blocks of each
    row, else dequantized (a K-quant's 256-value blocks rarely fall on a rank's boundary)."""
    values = gguf.GGML_QUANT_SIZES[tensor.qtype][0]
    if start % values or stop % values:
        return np.ascontiguousarray(tensor.dequantize()[:, start:stop])
    per_block = row_bytes(tensor.qtype, values)
    data = tensor.data[:, start // values * per_block : stop // values * per_block]
    return QuantizedTensor(
        tensor.qtype, (tensor.shape[0], stop - start), np.ascontiguousarray(data)
    )
