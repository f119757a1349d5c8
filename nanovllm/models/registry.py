"""Architecture registry: config.json `architectures` -> model class."""

from __future__ import annotations

from nanovllm.errors import ModelLoadError
from nanovllm.models.llama import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

ARCHITECTURES: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def model_class(architecture: str) -> type[LlamaForCausalLM]:
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        supported = ", ".join(ARCHITECTURES)
        raise ModelLoadError(
            f"architecture {architecture!r} is not supported; supported: {supported}"
        ) from None
