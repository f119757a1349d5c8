"""Phi-3: Llama with the checkpoint's q/k/v and gate/up already fused, and LongRoPE.

The fused matrices are split into Llama's names as they are read (views, no copy) and fused
again by LlamaForCausalLM, so the shape checks and weight preparation stay in one place.
LongRoPE (`rope_scaling` type "longrope", first called "su") is in models/rope.py; Phi-3's
sliding window, when its config has one, applies to every layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from nanovllm.errors import ModelLoadError
from nanovllm.models.llama import LlamaForCausalLM
from nanovllm.models.quantized import QuantizedTensor

_QKV, _GATE_UP = "self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"


class Phi3ForCausalLM(LlamaForCausalLM):
    def _checkpoint_tensors(
        self, weights: Iterable[tuple[str, np.ndarray]]
    ) -> Iterator[tuple[str, np.ndarray]]:
        cfg = self.checkpoint_config  # the fused tensors are whole, also on a tensor-parallel rank
        q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        for name, tensor in weights:
            prefix = name.rsplit(".", 3)[0] + "."
            if name.endswith(_QKV):
                q, k, v = _split(name, tensor, (q_rows, kv_rows, kv_rows))
                yield prefix + "self_attn.q_proj.weight", q
                yield prefix + "self_attn.k_proj.weight", k
                yield prefix + "self_attn.v_proj.weight", v
            elif name.endswith(_GATE_UP):
                gate, up = _split(name, tensor, (cfg.intermediate_size,) * 2)
                yield prefix + "mlp.gate_proj.weight", gate
                yield prefix + "mlp.up_proj.weight", up
            else:
                yield name, tensor


def _split(name: str, tensor, rows: tuple[int, ...]) -> list:
    if tensor.shape[0] != sum(rows):
        raise ModelLoadError(
            f"tensor {name} has {tensor.shape[0]} rows, the config implies {sum(rows)}"
        )
    bounds = np.cumsum((0, *rows))
    return [_rows(tensor, slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _rows(tensor: np.ndarray | QuantizedTensor, rows: slice) -> np.ndarray | QuantizedTensor:
    """A slice of rows, a view either way."""
    return tensor.take_rows(rows) if isinstance(tensor, QuantizedTensor) else tensor[rows]
