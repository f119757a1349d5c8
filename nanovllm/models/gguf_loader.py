"""Load a GGUF file: ModelConfig and tokenizer from its metadata, HF-named float32 weights from its tensors.

The `gguf` package memory-maps the file; `load_gguf` reads the metadata and checks every tensor
(name, quantization, shape) up front, so a bad file fails before any weight is touched.
`GGUFCheckpoint.weights()` then dequantizes one tensor at a time, under Hugging Face names, in the
layout transformers uses (llama.cpp's Q/K row permutation undone), ready for the model loader.
"""

from __future__ import annotations

import math
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
from nanovllm.models.registry import model_class
from nanovllm.models.tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# Each checked against an independent reference in tests/test_gguf.py.
DEQUANTIZABLE = frozenset(
    Q[name] for name in "F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K Q4_K Q5_K Q6_K".split()
)

_CHUNK_VALUES = 1 << 22  # values dequantized per step

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
    data: np.ndarray  # a view into the memory-mapped file: raw blocks, not yet dequantized
    qtype: Q
    shape: tuple[int, ...]  # HF (row-major) order
    unpermute_heads: int  # > 0: undo llama.cpp's rotary row permutation over this many heads


@dataclass(slots=True)
class GGUFCheckpoint:
    config: ModelConfig
    tokenizer: Tokenizer
    generation_config: dict
    _tensors: list[_Tensor] = field(default_factory=list, repr=False)

    def weights(self) -> Iterator[tuple[str, np.ndarray]]:
        """(HF name, float32 array) pairs, each tensor dequantized only when it is reached."""
        for tensor in self._tensors:
            yield tensor.hf_name, _load(tensor)


def load_gguf(path: str | Path) -> GGUFCheckpoint:
    """Read a GGUF file's metadata and tensor index; weights stay on disk until `weights()`."""
    meta, raw = _read(Path(path))
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    tokenizer = build_tokenizer(meta)
    config = _model_config(meta, arch, raw)
    tensors = [_plan(t, arch, config) for name, t in raw.items() if name != _ROPE_FREQS]
    generation_config = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_ids}
    return GGUFCheckpoint(config, tokenizer, generation_config, tensors)


def dequantize(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    """A tensor's raw GGUF blocks (one row of blocks per tensor row) as a float32 array of `shape`
    (row-major, HF order) that the caller owns."""
    if qtype not in DEQUANTIZABLE:
        raise ModelLoadError(
            f"nanovllm cannot dequantize {qtype.name}; supported: {_supported_names()}"
        )
    out = np.empty(shape, dtype=np.float32)
    rows_in = raw.reshape(raw.shape[0] if raw.ndim > 1 else 1, -1)
    rows_out = out.reshape(len(rows_in), -1)
    # A few rows at a time: the dequantizer's scratch arrays are several times its output, which
    # for a large embedding matrix would otherwise cost gigabytes at once.
    step = max(1, _CHUNK_VALUES // rows_out.shape[1])
    for start in range(0, len(rows_in), step):
        rows_out[start : start + step] = gguf.quants.dequantize(
            rows_in[start : start + step], qtype
        )
    return out


def _load(tensor: _Tensor) -> np.ndarray:
    weight = dequantize(tensor.data, tensor.qtype, tensor.shape)
    return _unpermute(weight, tensor.unpermute_heads) if tensor.unpermute_heads else weight


def _supported_names() -> str:
    return ", ".join(q.name for q in sorted(DEQUANTIZABLE))


def _unpermute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's convert-time `permute`, which interleaves each head's two rotary
    halves (HF's rotate_half layout) into the adjacent pairs GGML's rope kernel wants."""
    rows = weight.shape[0]
    split = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2).reshape(weight.shape))


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata, tensors by GGUF name); the reader itself is dropped, since its parsed
    vocabulary fields take far more memory than the few views into the file we keep."""
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
        return meta, {t.name: t for t in reader.tensors}
    except (ValueError, IndexError, KeyError, UnicodeDecodeError, OverflowError) as exc:
        raise ModelLoadError(
            f"{path} is truncated or corrupt: the GGUF reader failed with: {exc}"
        ) from None


def _plan(tensor: Any, arch: str, config: ModelConfig) -> _Tensor:
    hf_name = _hf_name(tensor.name, config.num_layers)
    if tensor.tensor_type not in DEQUANTIZABLE:
        raise ModelLoadError(
            f"tensor {tensor.name} uses quantization {tensor.tensor_type.name}, which nanovllm cannot "
            f"dequantize; supported: {_supported_names()}"
        )
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    _check_shape(tensor.name, shape, _expected_shape(hf_name, config))
    heads = 0
    if arch == "llama" and ".q_proj." in hf_name:
        heads = config.num_heads
    elif arch == "llama" and ".k_proj." in hf_name:
        heads = config.num_kv_heads
    return _Tensor(hf_name, tensor.data, tensor.tensor_type, shape, heads)


def _hf_name(name: str, num_layers: int) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_TENSOR.fullmatch(name)
    if match and match[2] in _LAYER_NAMES and int(match[1]) < num_layers:
        return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}.{match[3]}"
    raise ModelLoadError(f"GGUF tensor {name} has no counterpart in nanovllm's models")


def _expected_shape(hf_name: str, config: ModelConfig) -> tuple[int, ...] | None:
    """What the model class says this tensor's shape is (None: the model has no such tensor)."""
    family = model_class(config.architecture)
    if hf_name.startswith("model.layers."):
        return family.layer_tensor_shapes(config).get(hf_name.split(".", 3)[3])
    return family.global_tensor_shapes(config).get(hf_name)


def _check_shape(name: str, shape: tuple[int, ...], expected: tuple[int, ...] | None) -> None:
    if expected is None:
        raise ModelLoadError(f"GGUF tensor {name} has no counterpart in this model's layout")
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
        torch_dtype="float32",  # what weights() hands out, whatever the file stores
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
