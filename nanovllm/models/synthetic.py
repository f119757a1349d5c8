"""A synthetic model: a random Llama built in memory (no files, no tokenizer), for `nanovllm
check` and the kernel checks. Its weights are drawn large enough that greedy tokens are
decisive, not near-ties, so two backends that agree on logits agree on tokens.
"""

from __future__ import annotations

import numpy as np

from nanovllm.models.llama import LlamaForCausalLM
from nanovllm.models.loader import Checkpoint
from nanovllm.models.model_config import ModelConfig


def tiny_checkpoint(seed: int = 0) -> Checkpoint:
    """A random Llama with GQA and head_dim 64."""
    config = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=256, hidden_size=128,
        intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
        rms_norm_eps=1e-5, max_position_embeddings=64,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    shapes = dict(LlamaForCausalLM.global_tensor_shapes(config))
    for i in range(config.num_layers):
        layer = LlamaForCausalLM.layer_tensor_shapes(config)
        shapes |= {f"model.layers.{i}.{key}": shape for key, shape in layer.items()}
    tensors = {name: _random_tensor(rng, name, shape) for name, shape in shapes.items()}
    return Checkpoint(config, None, {}, lambda: iter(tensors.items()))


def _random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) == 1:  # norm weights, away from 1 so that a dropped norm shows
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    rows, cols = shape
    if name == "model.embed_tokens.weight":
        std = 0.5
    elif name == "lm_head.weight":
        std = 4.0 / np.sqrt(cols)
    else:
        std = 1.5 / np.sqrt(cols)
    return (rng.standard_normal(shape) * std).astype(np.float32)
