"""Gemma 2 and Gemma 3 (text): the Llama decoder with Gemma's norms, scaling and caps.

What differs from Llama, each in one place below:
- RMSNorm multiplies by (1 + w): folded into the weight at load (`_norm`), so the model runs
  the ordinary rms_norm op.
- Four norms per layer: the attention and MLP outputs are normalized before their residual add.
- The embedding is scaled by sqrt(hidden); tied embeddings use the unscaled table as LM head.
- GeGLU MLP (config.hidden_act "gelu_pytorch_tanh"), picked by LlamaForCausalLM.
- Attention scores scaled by query_pre_attn_scalar^-1/2 instead of head_dim^-1/2; Gemma 2 caps
  them (50 * tanh(s / 50)) and both cap the final logits when the config says so.
- Alternating sliding-window and global layers (config.layer_types), read per layer by the
  attention op. Gemma 3 also normalizes q and k per head and rotates its sliding layers with
  another RoPE base (rope_local_theta, unscaled) than its global ones.
"""

from __future__ import annotations

import math

import numpy as np

from nanovllm.backends.base import Array, Backend
from nanovllm.models.llama import DecoderLayer, LlamaForCausalLM
from nanovllm.models.model_config import ModelConfig
from nanovllm.models.rope import rope_cos_sin

LOCAL_ROPE_THETA = 10000.0  # Gemma 3's sliding layers when config.json does not say


class Gemma2ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig, backend: Backend, max_positions: int) -> None:
        super().__init__(config, backend, max_positions)
        if config.query_pre_attn_scalar:
            self.scale = 1.0 / math.sqrt(config.query_pre_attn_scalar)
        self.attn_soft_cap = float(config.attn_logit_softcapping or 0.0)
        self.final_soft_cap = float(config.final_logit_softcapping or 0.0)
        # transformers rounds the multiplier to the activation dtype before it multiplies. A
        # NumPy scalar, not a 0-d array: CuPy takes no NumPy array as an operand.
        self.embed_scale = np.dtype(backend.dtype).type(math.sqrt(config.hidden_size))

    def compute_logits(self, hidden: Array) -> Array:
        logits = super().compute_logits(hidden)
        return self.backend.soft_cap(logits, self.final_soft_cap) if self.final_soft_cap else logits

    def _embed(self, input_ids: Array) -> Array:
        return super()._embed(input_ids) * self.embed_scale

    def _decoder_layer(self, index, layer, hidden, residual, positions, meta, kv_cache):
        ops, eps = self.backend, self.config.rms_norm_eps
        x, residual = ops.rms_norm(hidden, layer.input_norm, eps, residual)
        attn = self._attention(index, layer, x, positions, meta, *kv_cache)
        attn, _ = ops.rms_norm(attn, layer.post_norm, eps)
        x, residual = ops.rms_norm(attn, layer.pre_ff_norm, eps, residual)
        out, _ = ops.rms_norm(self._mlp(layer.mlp, x), layer.post_ff_norm, eps)
        return out, residual

    def _layer_keys(self, index: int) -> list[str]:
        norms = ["pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"]
        return super()._layer_keys(index) + norms

    def _build_layer(self, index: int, t: dict[str, np.ndarray]) -> DecoderLayer:
        layer = super()._build_layer(index, t)
        layer.pre_ff_norm = self._norm(t["pre_feedforward_layernorm.weight"])
        layer.post_ff_norm = self._norm(t["post_feedforward_layernorm.weight"])
        return layer

    def _norm(self, tensor: np.ndarray) -> Array:
        # Gemma's RMSNorm computes x_normed * (1 + w) in float32; adding 1 once here in
        # float32 gives the same factor.
        return self._param(np.asarray(tensor, dtype=np.float32) + np.float32(1.0))


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = True

    def __init__(self, config: ModelConfig, backend: Backend, max_positions: int) -> None:
        super().__init__(config, backend, max_positions)
        base = config.rope_local_theta or LOCAL_ROPE_THETA
        local = backend.asarray(
            rope_cos_sin(config.head_dim, base, max_positions, None), np.float32
        )
        self.layer_cos_sin = [
            local if config.window(i) else self.cos_sin for i in range(config.num_layers)
        ]
