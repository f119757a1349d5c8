"""ModelConfig: the architecture facts a model needs, normalized from config.json or GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nanovllm.errors import ModelLoadError

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    # Attention: a query at position p sees cache positions p - W + 1 .. p on a layer whose
    # type is SLIDING (every layer when layer_types is None), all of them otherwise.
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    hidden_act: str = "silu"
    query_pre_attn_scalar: float | None = None  # Gemma: scores scaled by its -1/2 power
    attn_logit_softcapping: float | None = None  # Gemma 2: cap * tanh(score / cap)
    final_logit_softcapping: float | None = None
    rope_local_theta: float | None = None  # Gemma 3: the sliding layers' RoPE base
    partial_rotary_factor: float = 1.0  # the fraction of head_dim rotated (we rotate all)
    # Mixture of experts (num_experts 0: a dense MLP on every layer).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalize the top-k routing weights to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert
    dense_layers: list[int] = field(default_factory=list)  # MoE models' layers with a dense MLP
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str = "float32"

    def window(self, layer: int) -> int:
        """The attention window of a layer in tokens; 0 for full causal attention."""
        if not self.sliding_window:
            return 0
        if self.layer_types is not None and self.layer_types[layer] != SLIDING:
            return 0
        return int(self.sliding_window)

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_layers

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face config.json dict (transformers 4 and 5 layouts)."""
        try:
            architecture = hf["architectures"][0]
            num_heads = hf["num_attention_heads"]
            hidden = hf["hidden_size"]
            rope, local_rope = _rope_parameters(hf)
            eos = hf.get("eos_token_id")
            experts = hf.get("num_local_experts") or hf.get("num_experts") or 0
            config = cls(
                architecture=architecture,
                vocab_size=hf["vocab_size"],
                hidden_size=hidden,
                intermediate_size=hf["intermediate_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=num_heads,
                num_kv_heads=hf.get("num_key_value_heads") or num_heads,
                head_dim=hf.get("head_dim") or hidden // num_heads,
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                rope_scaling=_rope_scaling(hf, rope),
                max_position_embeddings=hf.get("max_position_embeddings", 4096),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=bool(hf.get("attention_bias", False)),
                sliding_window=hf.get("sliding_window") or None,
                layer_types=_layer_types(architecture, hf),
                hidden_act=hf.get("hidden_activation") or hf.get("hidden_act") or "silu",
                query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
                attn_logit_softcapping=hf.get("attn_logit_softcapping"),
                final_logit_softcapping=hf.get("final_logit_softcapping"),
                rope_local_theta=local_rope.get("rope_theta", hf.get("rope_local_base_freq")),
                partial_rotary_factor=rope.get("partial_rotary_factor")
                or hf.get("partial_rotary_factor")
                or 1.0,
                num_experts=experts,
                num_experts_per_tok=hf.get("num_experts_per_tok") or 0,
                # Mixtral's experts are intermediate_size wide; Qwen's MoE say so apart.
                moe_intermediate_size=hf.get("moe_intermediate_size")
                or (hf["intermediate_size"] if experts else 0),
                norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size") or 0,
                dense_layers=_dense_layers(hf) if experts else [],
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=_as_id_list(eos),
                torch_dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
            )
        except (KeyError, IndexError, TypeError) as exc:
            raise ModelLoadError(f"config.json is missing a required field: {exc}") from None
        if config.layer_types is not None and len(config.layer_types) != config.num_layers:
            raise ModelLoadError(
                f"config.json lists {len(config.layer_types)} layer_types for "
                f"{config.num_layers} layers"
            )
        return config


def _rope_parameters(hf: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(global, local) RoPE parameters. transformers 5 nests them per layer type for models
    whose sliding layers rotate with another base (Gemma 3)."""
    rope = hf.get("rope_parameters") or {}
    if FULL in rope or SLIDING in rope:
        return rope.get(FULL) or {}, rope.get(SLIDING) or {}
    return rope, {}


def _rope_scaling(hf: dict[str, Any], rope: dict[str, Any]) -> dict[str, Any] | None:
    scaling = hf.get("rope_scaling") or _scaling_from_rope_parameters(rope)
    if scaling is None:
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in ("longrope", "su"):
        # Phi-3 keeps the pretraining length at the top level (transformers 4) and derives the
        # scale factor from the two lengths when the checkpoint does not state it.
        original = scaling.get("original_max_position_embeddings") or hf.get(
            "original_max_position_embeddings"
        )
        scaling = {**scaling, "original_max_position_embeddings": original}
        scaling.setdefault("max_position_embeddings", hf.get("max_position_embeddings"))
    return scaling


def _scaling_from_rope_parameters(rope: dict[str, Any]) -> dict[str, Any] | None:
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        return None
    return {k: v for k, v in rope.items() if k != "rope_theta"}


# Which layers slide when config.json predates `layer_types` (transformers 4 checkpoints).
_SLIDING_EVERY = {"Gemma2ForCausalLM": 2}  # layers 0, 2, 4, ... slide
_SLIDING_PATTERN_DEFAULT = {"Gemma3ForCausalLM": 6}  # every 6th layer is global
_WINDOW_FROM_LAYER = ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")  # layers >= max_window_layers


def _layer_types(architecture: str, hf: dict[str, Any]) -> list[str] | None:
    """Per-layer attention types, or None when the window (if any) applies to every layer."""
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    if not hf.get("sliding_window"):
        return None
    layers = hf["num_hidden_layers"]
    if architecture in _SLIDING_EVERY:
        return [SLIDING if i % 2 == 0 else FULL for i in range(layers)]
    if architecture in _SLIDING_PATTERN_DEFAULT:
        pattern = hf.get("sliding_window_pattern") or _SLIDING_PATTERN_DEFAULT[architecture]
        return [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
    if architecture in _WINDOW_FROM_LAYER:
        first = hf.get("max_window_layers", layers) if hf.get("use_sliding_window") else layers
        return [SLIDING if i >= first else FULL for i in range(layers)]
    if hf.get("use_sliding_window") is False:
        return [FULL] * layers
    return None


def _dense_layers(hf: dict[str, Any]) -> list[int]:
    """Layers of a mixture-of-experts model that keep a dense MLP (Qwen2/3-MoE's
    `mlp_only_layers` and `decoder_sparse_step`)."""
    step = hf.get("decoder_sparse_step") or 1
    only = set(hf.get("mlp_only_layers") or [])
    return [i for i in range(hf["num_hidden_layers"]) if i in only or (i + 1) % step]


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]
