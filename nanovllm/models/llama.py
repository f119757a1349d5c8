"""The Llama family written once against the op seam; Mistral, Qwen2 and Qwen3 differ only in flags.

Weights are held fused: q/k/v as one [(Hq + 2 Hkv) * D, H] matrix and gate/up as one [2F, H]
matrix, so each layer makes three matmuls instead of six. Matrices reach the model as the loader
read them (float arrays, or `QuantizedTensor`s still in the file's form) and the backend prepares
each one (`backend.weight`): dequantized on the reference backend, kept quantized by the CPU and
CUDA backends.

Other families build on this class through a few hooks (models/gemma.py, models/phi3.py,
models/moe.py): `_decoder_layer` (the residual/norm pattern), `_feed_forward` and
`_build_mlp` (the MLP), `_norm` (how a norm weight is prepared), `_checkpoint_tensors`
(checkpoint names to Llama's), `_layer_keys`/`_build_layer` (a layer's tensors). Per layer,
the attention window comes from the config and the rotary table from `layer_cos_sin`.

Tensor parallelism (models/sharding.py) adds one hook: with `parallel` set, the model is one
rank's share (its config says how many heads and how wide), each checkpoint tensor is sliced as
it arrives, and `_reduce` sums the partial outputs of o_proj and of the MLP over the ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from nanovllm.backends.base import Array, AttentionMetadata, Backend
from nanovllm.errors import ModelLoadError
from nanovllm.models.model_config import ModelConfig
from nanovllm.models.quantized import stack_rows
from nanovllm.models.rope import rope_cos_sin
from nanovllm.models.sharding import ParallelRank

KVCache = tuple[Array, Array]


@dataclass(slots=True)
class DenseMLP:
    gate_up: Array  # [2F, H]: gate rows, then up rows
    down: Array  # [H, F]


@dataclass(slots=True)
class DecoderLayer:
    input_norm: Array
    qkv: Array
    qkv_bias: Array | None
    q_norm: Array | None
    k_norm: Array | None
    o_proj: Array
    post_norm: Array
    mlp: Any  # DenseMLP, or what the family's _build_mlp makes (models/moe.py)
    pre_ff_norm: Array | None = None  # Gemma's norms around the MLP
    post_ff_norm: Array | None = None


_ACTIVATIONS = {"silu": "silu_and_mul", "gelu_pytorch_tanh": "gelu_tanh_and_mul"}


class LlamaForCausalLM:
    qkv_bias = False  # Qwen2 sets True
    qk_norm = False  # Qwen3 sets True
    parallel: ParallelRank | None = None  # set before load_weights on a tensor-parallel rank

    def __init__(self, config: ModelConfig, backend: Backend, max_positions: int) -> None:
        self.config = config
        self.backend = backend
        self.use_qkv_bias = self.qkv_bias or config.qkv_bias
        self.use_qk_norm = self.qk_norm or config.qk_norm
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.attn_soft_cap = 0.0  # Gemma 2 caps attention scores
        if config.hidden_act not in _ACTIVATIONS:
            raise ModelLoadError(
                f"activation {config.hidden_act!r} is not supported; supported: "
                f"{', '.join(_ACTIVATIONS)}"
            )
        self.activate = getattr(backend, _ACTIVATIONS[config.hidden_act])
        if config.partial_rotary_factor != 1.0:
            raise ModelLoadError(
                f"partial rotary embeddings (partial_rotary_factor {config.partial_rotary_factor}) "
                "are not supported; nanovllm rotates the whole head"
            )
        table = rope_cos_sin(config.head_dim, config.rope_theta, max_positions, config.rope_scaling)
        self.cos_sin = backend.asarray(table, np.float32)
        self.layer_cos_sin = [self.cos_sin] * config.num_layers
        self.layers: list[DecoderLayer] = []
        self.embed_tokens: Array = None
        self.norm: Array = None
        self.lm_head: Array = None

    # ---- forward ---------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Array,
        positions: Array,
        meta: AttentionMetadata,
        kv_caches: list[KVCache],
        inspect: Callable[[int, Array, Array | None], None] | None = None,
    ) -> Array:
        """Hidden states [T, H] after the final norm, for every token of the flat batch.
        inspect(index, hidden, residual), if given, sees the residual stream (hidden + residual)
        after the embedding (index -1) and after each layer: the engine's diagnosis of
        non-finite logits."""
        hidden = self._embed(input_ids)
        residual = None
        if inspect is not None:
            inspect(-1, hidden, residual)
        for index, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            hidden, residual = self._decoder_layer(
                index, layer, hidden, residual, positions, meta, kv_cache
            )
            if inspect is not None:
                inspect(index, hidden, residual)
        hidden, _ = self.backend.rms_norm(hidden, self.norm, self.config.rms_norm_eps, residual)
        return hidden

    def compute_logits(self, hidden: Array) -> Array:
        """[R, H] -> [R, vocab]; called only on rows that need a next token."""
        logits = self.backend.linear(hidden, self.lm_head)
        return (
            logits if self.parallel is None else self.parallel.gather_logits(self.backend, logits)
        )

    @property
    def checkpoint_config(self) -> ModelConfig:
        """The config the checkpoint was written for (`config` is one rank's share of it)."""
        return self.config if self.parallel is None else self.parallel.config

    def _embed(self, input_ids: Array) -> Array:
        if self.parallel is not None:
            return self.parallel.embed(self.backend, input_ids, self.embed_tokens)
        return self.backend.embedding(input_ids, self.embed_tokens)

    def _reduce(self, x: Array) -> Array:
        """A row-parallel output summed over the tensor-parallel ranks (itself on one rank)."""
        return x if self.parallel is None else self.parallel.comm.all_reduce(x)

    def _mlp(self, mlp, x: Array) -> Array:
        return self._reduce(self._feed_forward(mlp, x))

    def _decoder_layer(self, index, layer, hidden, residual, positions, meta, kv_cache):
        """One pre-norm block; returns (hidden, residual) with the residual add left to the
        next norm, which fuses it."""
        ops, eps = self.backend, self.config.rms_norm_eps
        x, residual = ops.rms_norm(hidden, layer.input_norm, eps, residual)
        hidden = self._attention(index, layer, x, positions, meta, *kv_cache)
        x, residual = ops.rms_norm(hidden, layer.post_norm, eps, residual)
        return self._mlp(layer.mlp, x), residual

    def _feed_forward(self, mlp: DenseMLP, x: Array) -> Array:
        ops = self.backend
        return ops.linear(self.activate(ops.linear(x, mlp.gate_up)), mlp.down)

    def _attention(self, index, layer, x, positions, meta, k_cache, v_cache) -> Array:
        ops, cfg = self.backend, self.config
        num_tokens, head_dim = x.shape[0], cfg.head_dim
        qkv = ops.linear(x, layer.qkv, layer.qkv_bias)
        q_size, kv_size = cfg.num_heads * head_dim, cfg.num_kv_heads * head_dim
        q = qkv[:, :q_size].reshape(num_tokens, cfg.num_heads, head_dim)
        k = qkv[:, q_size : q_size + kv_size].reshape(num_tokens, cfg.num_kv_heads, head_dim)
        v = qkv[:, q_size + kv_size :].reshape(num_tokens, cfg.num_kv_heads, head_dim)
        if self.use_qk_norm:
            q, _ = ops.rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
            k, _ = ops.rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
        q, k = ops.rotary(q, k, positions, self.layer_cos_sin[index])
        ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        window = cfg.window(index)
        out = ops.paged_attention(q, k_cache, v_cache, meta, self.scale, window, self.attn_soft_cap)
        return self._reduce(ops.linear(out.reshape(num_tokens, q_size), layer.o_proj))

    # ---- weights ---------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, np.ndarray]]) -> None:
        """Take Hugging Face-named tensors one at a time, fusing each layer's groups as they complete."""
        pending: list[dict[str, np.ndarray]] = [{} for _ in range(self.config.num_layers)]
        done: list[DecoderLayer | None] = [None] * self.config.num_layers
        top: dict[str, np.ndarray] = {}
        for name, tensor in self._checkpoint_tensors(weights):
            if self.parallel is not None:
                tensor = self.parallel.shard(name, tensor)
            if name.startswith("model.layers."):
                index, key = _split_layer_name(name)
                if index >= len(pending):
                    raise ModelLoadError(
                        f"checkpoint has tensor {name} but the config has {len(pending)} layers"
                    )
                pending[index][key] = tensor
                if self._layer_complete(index, pending[index]):
                    done[index] = self._build_layer(index, pending[index])
                    pending[index] = {}
            elif not name.endswith("rotary_emb.inv_freq"):
                top[name] = tensor
        self._finish(done, pending, top)

    def _checkpoint_tensors(self, weights):
        """The checkpoint's (name, tensor) pairs under the names this class loads."""
        return weights

    @classmethod
    def layer_tensor_shapes(cls, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Shape of every tensor of one dense Llama-layout decoder layer, by its Hugging Face name
        inside `model.layers.{i}.`."""
        hidden, inter, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
        q_rows, kv_rows = config.num_heads * head_dim, config.num_kv_heads * head_dim
        shapes = {
            "input_layernorm.weight": (hidden,),
            "post_attention_layernorm.weight": (hidden,),
            "self_attn.q_proj.weight": (q_rows, hidden),
            "self_attn.k_proj.weight": (kv_rows, hidden),
            "self_attn.v_proj.weight": (kv_rows, hidden),
            "self_attn.o_proj.weight": (hidden, q_rows),
            "mlp.gate_proj.weight": (inter, hidden),
            "mlp.up_proj.weight": (inter, hidden),
            "mlp.down_proj.weight": (hidden, inter),
        }
        if cls.qkv_bias or config.qkv_bias:
            shapes |= {
                "self_attn.q_proj.bias": (q_rows,),
                "self_attn.k_proj.bias": (kv_rows,),
                "self_attn.v_proj.bias": (kv_rows,),
            }
        if cls.qk_norm or config.qk_norm:
            shapes |= {
                "self_attn.q_norm.weight": (head_dim,),
                "self_attn.k_norm.weight": (head_dim,),
            }
        return shapes

    @classmethod
    def global_tensor_shapes(cls, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Shapes of the tensors outside the layers (lm_head: unless tied)."""
        table = (config.vocab_size, config.hidden_size)
        shapes = {"model.embed_tokens.weight": table, "model.norm.weight": (config.hidden_size,)}
        if not config.tie_word_embeddings:
            shapes["lm_head.weight"] = table
        return shapes

    def _layer_keys(self, index: int) -> list[str]:
        keys = [
            "input_layernorm.weight", "post_attention_layernorm.weight",
            "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
        ]  # fmt: skip
        if self.use_qkv_bias:
            keys += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
        if self.use_qk_norm:
            keys += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
        return keys + self._mlp_keys(index)

    def _mlp_keys(self, index: int) -> list[str]:
        return ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]

    def _layer_complete(self, index: int, tensors: dict[str, np.ndarray]) -> bool:
        return all(key in tensors for key in self._layer_keys(index))

    def _build_layer(self, index: int, t: dict[str, np.ndarray]) -> DecoderLayer:
        shapes = self.layer_tensor_shapes(self.config)
        _check_shapes(index, t, {k: v for k, v in shapes.items() if k.startswith("self_attn.")})
        attn = "self_attn."
        return DecoderLayer(
            input_norm=self._norm(t["input_layernorm.weight"]),
            qkv=self._fuse(
                t, attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"
            ),
            qkv_bias=self._param(
                np.concatenate([t[attn + f"{p}_proj.bias"] for p in ("q", "k", "v")])
            )
            if self.use_qkv_bias
            else None,
            q_norm=self._norm(t[attn + "q_norm.weight"]) if self.use_qk_norm else None,
            k_norm=self._norm(t[attn + "k_norm.weight"]) if self.use_qk_norm else None,
            o_proj=self._matrix(t[attn + "o_proj.weight"]),
            post_norm=self._norm(t["post_attention_layernorm.weight"]),
            mlp=self._build_mlp(index, t),
        )

    def _build_mlp(self, index: int, t: dict[str, np.ndarray]) -> DenseMLP:
        return self._dense_mlp(index, t, "mlp.", self.config.intermediate_size)

    def _dense_mlp(self, index: int, t: dict[str, np.ndarray], prefix: str, width: int) -> DenseMLP:
        hidden = self.config.hidden_size
        gate, up, down = (prefix + f"{name}_proj.weight" for name in ("gate", "up", "down"))
        _check_shapes(index, t, {gate: (width, hidden), up: (width, hidden), down: (hidden, width)})
        return DenseMLP(gate_up=self._fuse(t, gate, up), down=self._matrix(t[down]))

    def _finish(self, done, pending, top) -> None:
        for index, layer in enumerate(done):
            if layer is None:
                missing = [k for k in self._layer_keys(index) if k not in pending[index]]
                raise ModelLoadError(f"checkpoint is missing model.layers.{index}.{missing[0]}")
        self.layers = done
        for name in ("model.embed_tokens.weight", "model.norm.weight"):
            if name not in top:
                raise ModelLoadError(f"checkpoint is missing {name}")
        embed = top["model.embed_tokens.weight"]
        if embed.shape != (self.config.vocab_size, self.config.hidden_size):
            raise ModelLoadError(
                f"model.embed_tokens.weight has shape {embed.shape}, expected "
                f"({self.config.vocab_size}, {self.config.hidden_size})"
            )
        self.embed_tokens = self._matrix(embed)
        self.norm = self._norm(top["model.norm.weight"])
        if "lm_head.weight" in top and not self.config.tie_word_embeddings:
            self.lm_head = self._matrix(top["lm_head.weight"])
        elif self.config.tie_word_embeddings:
            self.lm_head = self.embed_tokens
        else:
            raise ModelLoadError("checkpoint is missing lm_head.weight and does not tie embeddings")

    def _param(self, tensor: np.ndarray) -> Array:
        """A vector (norm weight, bias) in the backend's compute dtype."""
        return self.backend.asarray(np.asarray(tensor), self.backend.dtype)

    def _matrix(self, tensor) -> Array:
        """A weight matrix as the backend runs it (float array or stored form, see quantized.py)."""
        return self.backend.weight(tensor)

    def _fuse(self, tensors: dict[str, np.ndarray], *keys: str) -> Array:
        """Matrices used together (q/k/v, gate/up) as one, rows in the order given."""
        return self._matrix(stack_rows([tensors[key] for key in keys]))

    def _norm(self, tensor: np.ndarray) -> Array:
        """An RMSNorm weight (Gemma adds 1 here)."""
        return self._param(tensor)


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True


def _check_shapes(index: int, t: dict[str, np.ndarray], expect: dict[str, tuple]) -> None:
    for key, shape in expect.items():
        if tuple(t[key].shape) != shape:
            raise ModelLoadError(
                f"tensor model.layers.{index}.{key} has shape {tuple(t[key].shape)}, the config implies {shape}"
            )


def _split_layer_name(name: str) -> tuple[int, str]:
    _, _, index, key = name.split(".", 3)
    return int(index), key
