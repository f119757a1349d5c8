"""ModelConfig: the architecture facts a model needs, normalized from config.json or GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nanovllm.errors import ModelLoadError


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
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str = "float32"

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face config.json dict (transformers 4 and 5 layouts)."""
        try:
            architecture = hf["architectures"][0]
            num_heads = hf["num_attention_heads"]
            hidden = hf["hidden_size"]
            rope = hf.get("rope_parameters") or {}
            rope_scaling = hf.get("rope_scaling") or _scaling_from_rope_parameters(rope)
            eos = hf.get("eos_token_id")
            return cls(
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
                rope_scaling=rope_scaling,
                max_position_embeddings=hf.get("max_position_embeddings", 4096),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=bool(hf.get("attention_bias", False)),
                sliding_window=hf.get("sliding_window")
                if hf.get("use_sliding_window", True)
                else None,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=_as_id_list(eos),
                torch_dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
            )
        except (KeyError, IndexError, TypeError) as exc:
            raise ModelLoadError(f"config.json is missing a required field: {exc}") from None


def _scaling_from_rope_parameters(rope: dict[str, Any]) -> dict[str, Any] | None:
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        return None
    return {k: v for k, v in rope.items() if k != "rope_theta"}


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]
