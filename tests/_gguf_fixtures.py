"""Tiny GGUF files for tests, written with `gguf.GGUFWriter` the way llama.cpp's convert script
lays them out: llama.cpp tensor names, GGUF dimension order, Q/K rows permuted for `llama`."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType


@dataclass
class TinyShape:
    hidden: int = 64
    intermediate: int = 96
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 24  # != hidden // heads, so the file must state it (attention.key_length)


def byte_level_vocab() -> dict[str, Any]:
    """A small byte-level BPE vocabulary: the 256 byte symbols, a few merges, two control tokens."""
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = ByteLevel.alphabet()
    symbols.sort(key=lambda s: ord(s))
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = symbols + [a + b for a, b in (m.split(" ") for m in merges)] + ["<|bos|>", "<|eos|>"]
    types = [1] * (len(tokens) - 2) + [3, 3]
    return {"tokens": tokens, "merges": merges, "types": types}


def hf_state_dict(
    arch: str, shape: TinyShape, rng: np.random.Generator, tied: bool
) -> dict[str, np.ndarray]:
    """Random weights under Hugging Face names, as transformers lays them out."""
    vocab = len(byte_level_vocab()["tokens"])
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    sd = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not tied:
        sd["lm_head.weight"] = (vocab, h)
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        sd |= {
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (shape.intermediate, h),
            p + "mlp.up_proj.weight": (shape.intermediate, h),
            p + "mlp.down_proj.weight": (h, shape.intermediate),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
        if arch == "qwen2":
            sd |= {
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
            }
        if arch == "qwen3":
            sd |= {
                p + "self_attn.q_norm.weight": (shape.head_dim,),
                p + "self_attn.k_norm.weight": (shape.head_dim,),
            }
    return {name: rng.normal(0, 1, dims).astype(np.float32) for name, dims in sd.items()}


_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, for Q (n_head) and K (n_kv_head)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_tensors(sd: dict[str, np.ndarray], arch: str, shape: TinyShape) -> dict[str, np.ndarray]:
    out = {}
    for name, w in sd.items():
        if name in _TOP:
            out[_TOP[name]] = w
            continue
        _, _, layer, rest = name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        if arch == "llama" and module == "self_attn.q_proj":
            w = llama_cpp_permute(w, shape.heads)
        if arch == "llama" and module == "self_attn.k_proj":
            w = llama_cpp_permute(w, shape.kv_heads)
        out[f"blk.{layer}.{_TO_GGUF[module]}.{kind}"] = w
    return out


def write_gguf(
    path: Path,
    arch: str,
    tensors: dict[str, np.ndarray | tuple[np.ndarray, Q]],
    shape: TinyShape,
    vocab: dict[str, Any] | None = None,
    pre: str = "gpt-2",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a GGUF; a tensor is a float32 array, or (raw uint8 blocks, quantization type)."""
    vocab = vocab or byte_level_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(shape.layers)
    w.add_context_length(256)
    w.add_embedding_length(shape.hidden)
    w.add_feed_forward_length(shape.intermediate)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_key_length(shape.head_dim)
    w.add_value_length(shape.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(vocab["tokens"])
    w.add_token_merges(vocab["merges"])
    w.add_token_types(vocab["types"])
    w.add_bos_token_id(vocab["tokens"].index("<|bos|>") if "<|bos|>" in vocab["tokens"] else 1)
    w.add_eos_token_id(vocab["tokens"].index("<|eos|>") if "<|eos|>" in vocab["tokens"] else 2)
    for key, value in (extra or {}).items():
        _add_value(w, key, value)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            raw, qtype = value
            w.add_tensor(name, raw, raw_dtype=qtype)
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_value(w: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    else:
        w.add_uint32(key, value)


@functools.cache
def smollm2_vocab(path: Path) -> dict[str, Any]:
    """The real SmolLM2 vocabulary, to write into tiny files that name another pre-tokenizer
    (cached: callers must not modify it)."""
    reader = gguf.GGUFReader(path)
    field = lambda key: reader.fields[f"tokenizer.ggml.{key}"].contents()  # noqa: E731
    return {"tokens": field("tokens"), "merges": field("merges"), "types": field("token_type")}


def llama3_rope_factors(theta: float, head_dim: int, factor: float) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's rope_freqs for Llama 3.1 (low 1, high 4, context 8192)."""
    low, high, context = 1.0, 4.0, 8192
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < context / high:
            out.append(1.0)
        elif wavelen > context / low:
            out.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# A Q4_K_M-like mix (the kinds Qwen2.5's file uses) that each kernel can take: K-quants only
# where K is a multiple of 256, and q/k/v of two types, so the fused qkv stays mixed.
QUANTIZED_MIX = {
    "token_embd": "q8_0", "output": "q6_k", "attn_q": "q5_0", "attn_k": "q5_0",
    "attn_v": "q8_0", "attn_output": "q4_1", "ffn_gate": "q4_k", "ffn_up": "q4_k",
    "ffn_down": "q6_k",
}  # fmt: skip
QUANTIZED_SHAPE = TinyShape(
    hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, head_dim=32
)


def write_quantized_qwen2(path: Path, seed: int = 0) -> Path:
    """A tiny Qwen2 GGUF (QKV bias, untied LM head) whose matrices are stored in QUANTIZED_MIX:
    the 32-value formats quantized by the `gguf` package, the K-quants random blocks with sane
    scales (the package cannot quantize those)."""
    from nanovllm.backends.matmul_cases import random_blocks

    rng = np.random.default_rng(seed)
    shape = QUANTIZED_SHAPE
    sd = hf_state_dict("qwen2", shape, rng, tied=False)
    tensors: dict[str, Any] = {}
    for name, weight in gguf_tensors(sd, "qwen2", shape).items():
        kind = name.split(".")[-2]
        if weight.ndim == 1:
            tensors[name] = weight if kind.endswith("norm") else weight * np.float32(0.1)
            continue
        fmt = QUANTIZED_MIX[kind]
        rows, cols = weight.shape
        if fmt in ("q4_k", "q5_k", "q6_k"):
            blocks = random_blocks(fmt, rows, cols, rng)
        else:
            scale = 1.0 if kind == "token_embd" else 1.5 / math.sqrt(cols)
            blocks = gguf.quants.quantize(weight * np.float32(scale), Q[fmt.upper()])
        tensors[name] = (blocks, Q[fmt.upper()])
    return write_gguf(path, "qwen2", tensors, shape)
