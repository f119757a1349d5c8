"""Load a GGUF file: ModelConfig and tokenizer from its metadata, HF-named weights from its tensors.

`load_gguf` reads the metadata and checks every tensor (name, quantization, shape) up front, so a
bad file fails before any weight is touched. `GGUFCheckpoint.weights()` then hands out one tensor
at a time under Hugging Face names, in the layout transformers uses (llama.cpp's Q/K row
permutation undone): matrices as `QuantizedTensor`s, their blocks still in the memory-mapped file;
norms and biases as float32 arrays. The backend decides whether a matrix stays quantized.
"""

from __future__ import annotations

import math
import mmap
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np

from nanovllm.errors import ModelLoadError
from nanovllm.models.gguf_tokenizer import build_tokenizer, end_of_generation_ids
from nanovllm.models.model_config import ModelConfig
from nanovllm.models.quantized import (
    DEQUANTIZABLE,
    QuantizedTensor,
    dequantize,
    supported_names,
)
from nanovllm.models.tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType
__all__ = ["DEQUANTIZABLE", "GGUFCheckpoint", "dequantize", "load_gguf"]

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# llama.cpp stores Llama 3 rope scaling as this tensor of per-frequency factors; we read it back
# into config.rope_scaling and do not hand it to the model.
_ROPE_FREQS = "rope_freqs.weight"


class _Tensor(NamedTuple):
    hf_name: str
    data: np.ndarray  # uint8 view into the memory-mapped file: raw blocks, not yet dequantized
    qtype: Q
    shape: tuple[int, ...]  # HF (row-major) order
    unpermute_heads: int  # > 0: undo llama.cpp's rotary row permutation over this many heads


@dataclass(slots=True)
class GGUFCheckpoint:
    config: ModelConfig
    tokenizer: Tokenizer
    generation_config: dict
    _tensors: list[_Tensor] = field(default_factory=list, repr=False)
    _map: mmap.mmap | None = field(default=None, repr=False)

    def weights(self) -> Iterator[tuple[str, np.ndarray | QuantizedTensor]]:
        """(HF name, weight) pairs: a QuantizedTensor for each matrix, a float32 array for each
        vector, each read only when it is reached."""
        for tensor in self._tensors:
            yield tensor.hf_name, _load(tensor)
        self._release_pages()

    def _release_pages(self) -> None:
        """Drop the file pages the load touched from this process's resident set. Fusing and
        un-permuting copied some matrices out of the map; without this their source pages would
        stay counted (RSS ~1.3x the file). Pages still used fault back in from the page cache."""
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)


def load_gguf(path: str | Path) -> GGUFCheckpoint:
    """Read a GGUF file's metadata and tensor index; weights stay on disk until `weights()`."""
    meta, raw, file_map = _read(Path(path))
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    tokenizer = build_tokenizer(meta)
    config = _model_config(meta, arch, raw)
    tensors = [_plan(t, arch, config, file_map) for name, t in raw.items() if name != _ROPE_FREQS]
    generation_config = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_ids}
    return GGUFCheckpoint(config, tokenizer, generation_config, tensors, file_map)


def _load(tensor: _Tensor) -> np.ndarray | QuantizedTensor:
    if len(tensor.shape) == 2:
        rows = tensor.data.reshape(tensor.shape[0], -1)
        weight = QuantizedTensor(tensor.qtype, tensor.shape, rows)
        if tensor.unpermute_heads:
            return weight.take_rows(_unpermute_order(tensor.shape[0], tensor.unpermute_heads))
        return weight
    vector = dequantize(tensor.data, tensor.qtype, tensor.shape)
    if tensor.unpermute_heads:
        return vector[_unpermute_order(tensor.shape[0], tensor.unpermute_heads)]
    return vector


def _unpermute_order(rows: int, n_heads: int) -> np.ndarray:
    """Row order undoing llama.cpp's convert-time `permute`, which interleaves each head's two
    rotary halves (HF's rotate_half layout) into the adjacent pairs GGML's rope kernel wants."""
    return np.arange(rows).reshape(n_heads, rows // n_heads // 2, 2).swapaxes(1, 2).reshape(-1)


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Any], mmap.mmap]:
    """(metadata, tensors by GGUF name, the file mapped read-only). The reader itself is dropped,
    since its parsed vocabulary fields take far more memory than the views into the file we keep;
    tensors are read through our own map, whose pages we can release."""
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(
            f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)"
        )
    try:
        reader = gguf.GGUFReader(path)
        meta = {name: f.contents() for name, f in reader.fields.items()}
        tensors = {t.name: t for t in reader.tensors}
    except (ValueError, IndexError, KeyError, UnicodeDecodeError, OverflowError) as exc:
        raise ModelLoadError(
            f"{path} is truncated or corrupt: the GGUF reader failed with: {exc}"
        ) from None
    with open(path, "rb") as f:
        file_map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return meta, tensors, file_map


def _plan(tensor: Any, arch: str, config: ModelConfig, file_map: mmap.mmap) -> _Tensor:
    hf_name = _hf_name(tensor.name, config.num_layers)
    if tensor.tensor_type not in DEQUANTIZABLE:
        raise ModelLoadError(
            f"tensor {tensor.name} uses quantization {tensor.tensor_type.name}, which nanovllm cannot "
            f"dequantize; supported: {supported_names()}"
        )
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    _check_shape(tensor.name, shape, _expected_shape(hf_name, config))
    heads = 0
    if arch == "llama" and ".q_proj." in hf_name:
        heads = config.num_heads
    elif arch == "llama" and ".k_proj." in hf_name:
        heads = config.num_kv_heads
    data = np.frombuffer(file_map, np.uint8, count=tensor.n_bytes, offset=tensor.data_offset)
    return _Tensor(hf_name, data, tensor.tensor_type, shape, heads)


def _hf_name(name: str, num_layers: int) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_TENSOR.fullmatch(name)
    if match and match[2] in _LAYER_NAMES and int(match[1]) < num_layers:
        return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}.{match[3]}"
    raise ModelLoadError(f"GGUF tensor {name} has no counterpart in nanovllm's models")


def _expected_shape(hf_name: str, c: ModelConfig) -> tuple[int, ...]:
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    part = hf_name.rsplit(".", 2)[-2]
    shapes = {
        "embed_tokens": (c.vocab_size, c.hidden_size),
        "lm_head": (c.vocab_size, c.hidden_size),
        "q_proj": (q, c.hidden_size),
        "k_proj": (kv, c.hidden_size),
        "v_proj": (kv, c.hidden_size),
        "o_proj": (c.hidden_size, q),
        "gate_proj": (c.intermediate_size, c.hidden_size),
        "up_proj": (c.intermediate_size, c.hidden_size),
        "down_proj": (c.hidden_size, c.intermediate_size),
        "q_norm": (c.head_dim,),
        "k_norm": (c.head_dim,),
    }
    expected = shapes.get(part, (c.hidden_size,))  # the remaining weights are RMSNorm vectors
    return expected[:1] if hf_name.endswith(".bias") else expected


def _check_shape(name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if shape != expected:
        raise ModelLoadError(
            f"GGUF tensor {name} has shape {shape}, but the metadata implies {expected}"
        )


def _model_config(meta: dict[str, Any], arch: str, raw: dict[str, Any]) -> ModelConfig:
    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelLoadError(f"GGUF metadata lacks {arch}.{name}")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    rotary = int(key("rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise ModelLoadError(
            f"GGUF model rotates {rotary} of {head_dim} head dimensions; nanovllm rotates all"
        )
    theta = float(key("rope.freq_base", 10000.0))
    eos_ids = end_of_generation_ids(meta)
    return ModelConfig(
        architecture=ARCHITECTURES[arch],
        vocab_size=len(meta.get("tokenizer.ggml.tokens") or []),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=_single_int(
            key("attention.head_count_kv", heads), f"{arch}.attention.head_count_kv"
        ),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(meta, arch, raw.get(_ROPE_FREQS), theta, head_dim),
        max_position_embeddings=int(key("context_length", 4096)),
        tie_word_embeddings="output.weight" not in raw,
        qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in raw,
        qk_norm=arch == "qwen3" or "blk.0.attn_q_norm.weight" in raw,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids,
        torch_dtype="float32",  # what the reference backend computes in
    )


def _single_int(value: Any, key: str) -> int:
    # Some architectures give one KV head count per layer; ours need one for all.
    values = set(value) if isinstance(value, list) else {value}
    if len(values) != 1:
        raise ModelLoadError(
            f"GGUF {key} varies across layers ({sorted(values)}); nanovllm needs one value"
        )
    return int(values.pop())


def _rope_scaling(
    meta: dict[str, Any], arch: str, freqs: Any, theta: float, head_dim: int
) -> dict | None:
    if freqs is not None:
        return _llama3_scaling(
            gguf.quants.dequantize(freqs.data, freqs.tensor_type), theta, head_dim
        )
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if kind == "none" or factor is None:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn" and original is not None:
        return {
            "rope_type": "yarn",
            "factor": float(factor),
            "original_max_position_embeddings": int(original),
        }
    raise ModelLoadError(
        f"GGUF rope scaling {kind!r} is not supported (supported: linear, yarn, llama3)"
    )


def _llama3_scaling(factors: np.ndarray, theta: float, head_dim: int) -> dict:
    """Recover Llama 3's rope_scaling from the per-frequency factors llama.cpp precomputed.

    The file keeps only the factors; the scaling parameters behind them are Meta's released
    values (low 1, high 4, original context 8192) with `factor` the largest factor. We recompute
    the factors from those parameters (llama.cpp's formula) and refuse a file they do not explain.
    """
    scaling = {
        "rope_type": "llama3",
        "factor": float(np.max(factors)),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    expected = _llama3_factors(scaling, theta, head_dim)
    if factors.shape != expected.shape or not np.allclose(expected, factors, rtol=1e-4):
        raise ModelLoadError(
            "GGUF rope_freqs.weight does not match Llama 3 rope scaling; nanovllm cannot use it"
        )
    return scaling


def _llama3_factors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < context / high:
            factors.append(1.0)
        elif wavelen > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors)
