"""Model definitions, the architecture registry and weight loading (safetensors, GGUF, Hub)."""

from nanovllm.models.loader import LoadedModel, load_checkpoint, load_model

__all__ = ["LoadedModel", "load_checkpoint", "load_model"]
