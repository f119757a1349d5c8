"""Load a GGUF file: ModelConfig and tokenizer from its metadata, HF-named weights from its tensors.

`load_gguf` reads the metadata and checks every tensor (name, quantization, shape) up front, so a
bad file fails before any weight is touched. `GGUFCheckpoint.weights()` then hands out one tensor
at a time under Hugging Face names, in the layout transformers uses (llama.cpp's Q/K row
permutation and Gemma's +1 on norm weights undone, stacked expert tensors split per expert):
matrices as `QuantizedTensor`s, their blocks still in the memory-mapped file; norms and biases as
float32 arrays. The backend decides whether a matrix stays quantized.

Names and metadata keys follow llama.cpp's gguf-py constants and what its convert_hf_to_gguf.py
writes for each architecture; where the file leaves a fact out, we take the value llama.cpp's
loader assumes (Gemma 2 and 3's window patterns, Gemma 3's local RoPE base, Gemma's query scale,
whether an architecture renormalizes its top-k routing weights).
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np

from nanovllm.errors import ModelLoadError
from nanovllm.models.gguf_file import TensorInfo, read_header
from nanovllm.models.gguf_tokenizer import build_tokenizer, end_of_generation_ids
from nanovllm.models.model_config import FULL, SLIDING, ModelConfig
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
    "llama": "LlamaForCausalLM",  # MixtralForCausalLM when the file has experts
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
}
_GEMMA = ("gemma2", "gemma3")

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
_QWEN_MOE_NAMES = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.{expert}.gate_proj",
    "ffn_up_exps": "mlp.experts.{expert}.up_proj",
    "ffn_down_exps": "mlp.experts.{expert}.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_GEMMA_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",  # Gemma's ffn_norm is the norm before the MLP
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Where an architecture's tensors differ from the common names above.
_ARCH_LAYER_NAMES = {
    "llama": {  # Mixtral: llama with experts
        "ffn_gate_inp": "block_sparse_moe.gate",
        "ffn_gate_exps": "block_sparse_moe.experts.{expert}.w1",
        "ffn_up_exps": "block_sparse_moe.experts.{expert}.w3",
        "ffn_down_exps": "block_sparse_moe.experts.{expert}.w2",
    },
    "gemma2": _GEMMA_NAMES,
    "gemma3": _GEMMA_NAMES,
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},  # both fused
    "qwen2moe": _QWEN_MOE_NAMES,
    "qwen3moe": _QWEN_MOE_NAMES,
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# llama.cpp stores Llama 3 rope scaling as this tensor of per-frequency factors, and Phi-3's
# LongRoPE factors as two more; we read them back into config.rope_scaling and do not hand them
# to the model.
_ROPE_FREQS = "rope_freqs.weight"
_ROPE_LONG, _ROPE_SHORT = "rope_factors_long.weight", "rope_factors_short.weight"
_ROPE_TENSORS = (_ROPE_FREQS, _ROPE_LONG, _ROPE_SHORT)
# Gemma: convert_hf_to_gguf.py stores every RMSNorm weight as 1 + w (Gemma's RMSNorm factor).
_GEMMA_NORM_OFFSET = 1.0


class _Tensor(NamedTuple):
    hf_name: str  # with an {expert} field when the file stacks every expert's matrix
    data: np.ndarray  # uint8 view into the memory-mapped file: raw blocks, not yet dequantized
    qtype: Q
    shape: tuple[int, ...]  # HF (row-major) order
    unpermute_heads: int  # > 0: undo llama.cpp's rotary row permutation over this many heads
    offset: float = 0.0  # subtracted: what the converter added (Gemma's norm weights)
    experts: int = 0  # > 0: a stacked [experts, ...] tensor, handed out one expert at a time
    position: int = 0  # where its bytes start in the file


@dataclass(slots=True)
class GGUFCheckpoint:
    config: ModelConfig
    tokenizer: Tokenizer
    generation_config: dict
    _tensors: list[_Tensor] = field(default_factory=list, repr=False)
    _map: mmap.mmap | None = field(default=None, repr=False)

    @property
    def num_weights(self) -> int:
        """How many tensors weights() yields (stacked experts one by one)."""
        return sum(tensor.experts or 1 for tensor in self._tensors)

    def weights(self) -> Iterator[tuple[str, np.ndarray | QuantizedTensor]]:
        """(HF name, weight) pairs: a QuantizedTensor for each matrix, a float32 array for each
        vector, each read only when it is reached. The file pages of the tensors handed out
        so far are dropped from the resident set as the next one is reached (see
        _release_pages), so the load's peak holds about one layer of the file, not all of it."""
        released = 0
        for tensor in self._tensors:
            released = self._release_pages(released, tensor.position)
            weight = _load(tensor)
            if not tensor.experts:
                yield tensor.hf_name, weight
                continue
            rows = weight.shape[0] // tensor.experts
            for expert in range(tensor.experts):
                yield (
                    tensor.hf_name.format(expert=expert),
                    weight.take_rows(slice(expert * rows, (expert + 1) * rows)),
                )
        if self._map is not None:
            self._release_pages(0, len(self._map))  # and what building the last layers touched

    def _release_pages(self, start: int, stop: int) -> int:
        """Drop the file's pages in [start, stop) (whole pages) from this process's resident set;
        where the next release starts. Fusing and un-permuting copied some matrices out of the
        map, whose source pages would otherwise stay counted (RSS ~1.3x the file); the model
        builds a layer when its last tensor arrives, before the next is reached. Pages still in
        use fault back in from the page cache."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return start
        first, end = start // mmap.PAGESIZE * mmap.PAGESIZE, stop // mmap.PAGESIZE * mmap.PAGESIZE
        if end <= first:
            return start
        self._map.madvise(mmap.MADV_DONTNEED, first, end - first)
        return end


def load_gguf(path: str | Path, with_tokenizer: bool = True) -> GGUFCheckpoint:
    """Read a GGUF file's metadata and tensor index; weights stay on disk until `weights()`.
    with_tokenizer=False skips rebuilding the tokenizer (the caller brings its own)."""
    meta, raw, file_map = _read(Path(path))
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    tokenizer = build_tokenizer(meta) if with_tokenizer else None
    config = _model_config(meta, arch, raw)
    tensors = [
        _plan(t, arch, config, file_map) for name, t in raw.items() if name not in _ROPE_TENSORS
    ]
    generation_config = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_ids}
    return GGUFCheckpoint(config, tokenizer, generation_config, tensors, file_map)


def _load(tensor: _Tensor) -> np.ndarray | QuantizedTensor:
    """A matrix (stacked experts: all their rows, one after the other) as stored; a vector
    dequantized to float32."""
    if len(tensor.shape) >= 2:
        rows = int(np.prod(tensor.shape[:-1]))
        weight = QuantizedTensor(
            tensor.qtype, (rows, tensor.shape[-1]), tensor.data.reshape(rows, -1)
        )
        if tensor.unpermute_heads:
            return weight.take_rows(_unpermute_order(rows, tensor.unpermute_heads))
        return weight
    vector = dequantize(tensor.data, tensor.qtype, tensor.shape)
    if tensor.offset:
        vector -= np.float32(tensor.offset)
    if tensor.unpermute_heads:
        return vector[_unpermute_order(tensor.shape[0], tensor.unpermute_heads)]
    return vector


def _unpermute_order(rows: int, n_heads: int) -> np.ndarray:
    """Row order undoing llama.cpp's convert-time `permute`, which interleaves each head's two
    rotary halves (HF's rotate_half layout) into the adjacent pairs GGML's rope kernel wants."""
    return np.arange(rows).reshape(n_heads, rows // n_heads // 2, 2).swapaxes(1, 2).reshape(-1)


def _read(path: Path) -> tuple[dict[str, Any], dict[str, TensorInfo], mmap.mmap]:
    """(metadata, tensors by GGUF name, the file mapped read-only). Tensors are read through
    this map, whose pages the load releases."""
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(
                f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)"
            )
        file_map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        meta, tensors = read_header(file_map)
    except (
        ValueError,
        IndexError,
        KeyError,
        UnicodeDecodeError,
        OverflowError,
        struct.error,
    ) as exc:
        raise ModelLoadError(
            f"{path} is truncated or corrupt: reading its header failed: {exc}"
        ) from None
    return meta, tensors, file_map


def _plan(tensor: Any, arch: str, config: ModelConfig, file_map: mmap.mmap) -> _Tensor:
    hf_name = _hf_name(tensor.name, arch, config.num_layers)
    if tensor.tensor_type not in DEQUANTIZABLE:
        raise ModelLoadError(
            f"tensor {tensor.name} uses quantization {tensor.tensor_type.name}, which nanovllm cannot "
            f"dequantize; supported: {supported_names()}"
        )
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    expected = _expected_shape(hf_name, config)
    experts = config.num_experts if "{expert}" in hf_name else 0
    if experts:
        expected = (experts, *expected)
    if len(expected) == 2 and expected[0] == 1 and shape == expected[1:]:
        shape = expected  # a one-row matrix (Qwen2-MoE's shared expert gate) stored as a vector
    _check_shape(tensor.name, shape, expected)
    heads = 0
    if arch == "llama" and ".q_proj." in hf_name:
        heads = config.num_heads
    elif arch == "llama" and ".k_proj." in hf_name:
        heads = config.num_kv_heads
    offset = _GEMMA_NORM_OFFSET if arch in _GEMMA and tensor.name.endswith("norm.weight") else 0.0
    data = np.frombuffer(file_map, np.uint8, count=tensor.n_bytes, offset=tensor.data_offset)
    return _Tensor(
        hf_name, data, tensor.tensor_type, shape, heads, offset, experts, int(tensor.data_offset)
    )


def _hf_name(name: str, arch: str, num_layers: int) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_TENSOR.fullmatch(name)
    names = {**_LAYER_NAMES, **_ARCH_LAYER_NAMES.get(arch, {})}
    if match and match[2] in names and int(match[1]) < num_layers:
        return f"model.layers.{match[1]}.{names[match[2]]}.{match[3]}"
    raise ModelLoadError(f"GGUF tensor {name} has no counterpart in nanovllm's models")


def _expected_shape(hf_name: str, c: ModelConfig) -> tuple[int, ...]:
    """The HF shape of a tensor (of one expert's matrix, for stacked expert tensors)."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    part = hf_name.rsplit(".", 2)[-2]
    width = c.intermediate_size
    if ".experts." in hf_name:
        width = c.moe_intermediate_size
    elif ".shared_expert." in hf_name:
        width = c.shared_expert_intermediate_size
    shapes = {
        "embed_tokens": (c.vocab_size, c.hidden_size),
        "lm_head": (c.vocab_size, c.hidden_size),
        "q_proj": (q, c.hidden_size),
        "k_proj": (kv, c.hidden_size),
        "v_proj": (kv, c.hidden_size),
        "qkv_proj": (q + 2 * kv, c.hidden_size),
        "o_proj": (c.hidden_size, q),
        "gate_proj": (width, c.hidden_size),
        "up_proj": (width, c.hidden_size),
        "gate_up_proj": (2 * width, c.hidden_size),
        "down_proj": (c.hidden_size, width),
        "w1": (width, c.hidden_size),
        "w3": (width, c.hidden_size),
        "w2": (c.hidden_size, width),
        "gate": (c.num_experts, c.hidden_size),
        "shared_expert_gate": (1, c.hidden_size),
        "q_norm": (c.head_dim,),
        "k_norm": (c.head_dim,),
    }
    expected = shapes.get(part, (c.hidden_size,))  # the remaining weights are RMSNorm vectors
    return expected[:1] if hf_name.endswith(".bias") else expected


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
    context = int(key("context_length", 4096))
    eos_ids = end_of_generation_ids(meta)
    config = ModelConfig(
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
        rope_scaling=_rope_scaling(meta, arch, raw, theta, head_dim, context),
        max_position_embeddings=context,
        tie_word_embeddings="output.weight" not in raw,
        qkv_bias=arch in ("qwen2", "qwen2moe") or "blk.0.attn_q.bias" in raw,
        qk_norm=arch in ("qwen3", "qwen3moe") or "blk.0.attn_q_norm.weight" in raw,
        sliding_window=_sliding_window(meta, arch),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids,
        torch_dtype="float32",  # what the reference backend computes in
    )
    if arch in _GEMMA:
        _gemma_fields(config, meta, arch)
    if meta.get(f"{arch}.expert_count"):
        _moe_fields(config, meta, arch, raw)
    return config


def _sliding_window(meta: dict[str, Any], arch: str) -> int | None:
    # Only where llama.cpp applies it (Phi-3 writes 0 for none); Gemma 2 has a default below.
    if arch not in (*_GEMMA, "phi3"):
        return None
    return int(meta.get(f"{arch}.attention.sliding_window") or 0) or None


def _gemma_fields(config: ModelConfig, meta: dict[str, Any], arch: str) -> None:
    """What llama.cpp's Gemma 2/3 loaders read, or assume when the file is silent."""
    config.hidden_act = "gelu_pytorch_tanh"
    config.attn_logit_softcapping = meta.get(f"{arch}.attn_logit_softcapping")
    config.final_logit_softcapping = meta.get(f"{arch}.final_logit_softcapping")
    if arch == "gemma2" and config.sliding_window is None:
        config.sliding_window = 4096  # llama.cpp's default for Gemma 2
    # Layer i slides when i % period < period - 1: every other layer (Gemma 2), five of every
    # six (Gemma 3), unless the file gives the pattern.
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
    if isinstance(pattern, list):
        sliding = [bool(p) for p in pattern]
    else:
        sliding = [i % int(pattern) < int(pattern) - 1 for i in range(config.num_layers)]
    config.layer_types = [SLIDING if s else FULL for s in sliding]
    scale = meta.get(f"{arch}.attention.scale")
    if scale:
        config.query_pre_attn_scalar = 1.0 / float(scale) ** 2
    elif config.num_layers == _GEMMA_27B_LAYERS[arch]:
        # llama.cpp (after gemma_pytorch): the 27B models scale by hidden / heads.
        config.query_pre_attn_scalar = config.hidden_size / config.num_heads
    else:
        config.query_pre_attn_scalar = config.head_dim
    if arch == "gemma3":
        config.rope_local_theta = float(meta.get(f"{arch}.rope.freq_base_swa", 10000.0))


_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _moe_fields(config: ModelConfig, meta: dict[str, Any], arch: str, raw: dict[str, Any]) -> None:
    if arch == "llama":
        config.architecture = "MixtralForCausalLM"
    config.num_experts = int(meta[f"{arch}.expert_count"])
    config.num_experts_per_tok = int(meta.get(f"{arch}.expert_used_count") or 0)
    config.moe_intermediate_size = int(
        meta.get(f"{arch}.expert_feed_forward_length") or config.intermediate_size
    )
    config.shared_expert_intermediate_size = int(
        meta.get(f"{arch}.expert_shared_feed_forward_length") or 0
    )
    # llama.cpp renormalizes the top-k weights of llama (Mixtral) and qwen3moe, not qwen2moe.
    config.norm_topk_prob = bool(meta.get(f"{arch}.expert_weights_norm", arch != "qwen2moe"))
    config.dense_layers = [
        i for i in range(config.num_layers) if f"blk.{i}.ffn_gate_inp.weight" not in raw
    ]


def _single_int(value: Any, key: str) -> int:
    # Some architectures give one KV head count per layer; ours need one for all.
    values = set(value) if isinstance(value, list) else {value}
    if len(values) != 1:
        raise ModelLoadError(
            f"GGUF {key} varies across layers ({sorted(values)}); nanovllm needs one value"
        )
    return int(values.pop())


def _rope_scaling(
    meta: dict[str, Any], arch: str, raw: dict[str, Any], theta: float, head_dim: int, context: int
) -> dict | None:
    freqs = raw.get(_ROPE_FREQS)
    if _ROPE_LONG in raw and _ROPE_SHORT in raw:
        return _longrope_scaling(meta, arch, raw, context)
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


def _longrope_scaling(
    meta: dict[str, Any], arch: str, raw: dict[str, Any], context: int
) -> dict[str, Any]:
    """Phi-3's LongRoPE, from the two factor tensors and the rope.scaling keys."""
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if not original:
        raise ModelLoadError(
            f"GGUF has LongRoPE factors but no {arch}.rope.scaling.original_context_length"
        )

    def factors(name: str) -> list[float]:
        tensor = raw[name]
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type).ravel().tolist()

    scaling = {
        "rope_type": "longrope",
        "long_factor": factors(_ROPE_LONG),
        "short_factor": factors(_ROPE_SHORT),
        "original_max_position_embeddings": int(original),
        "max_position_embeddings": context,
    }
    attn_factor = meta.get(f"{arch}.rope.scaling.attn_factor")
    if attn_factor is not None:
        scaling["attention_factor"] = float(attn_factor)
    return scaling


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
