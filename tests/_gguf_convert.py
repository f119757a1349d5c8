"""A tiny Hugging Face checkpoint (tests/checkpoints.py) written as GGUF the way llama.cpp's
convert_hf_to_gguf.py writes its family, with the `gguf` package (llama.cpp's gguf-py):
tensor names from gguf-py's TensorNameMap, metadata keys from its GGUFWriter, and the
converter's per-family changes:

- llama (Mistral, Mixtral): Q/K rows permuted for GGML's rope; experts stacked per projection
  (`ffn_gate_exps`/`ffn_up_exps`/`ffn_down_exps` [E, ...]) and the router as `ffn_gate_inp`.
- gemma2/gemma3: every RMSNorm weight stored as 1 + w; soft-caps and the sliding window as keys.
- phi3: fused `attn_qkv` and `ffn_up` (gate|up) kept; LongRoPE as `rope_factors_long/short`
  tensors, `rope.scaling.original_context_length` and `rope.scaling.attn_factor`.
- qwen2moe/qwen3moe: experts stacked; `expert_feed_forward_length`, shared expert `*_shexp`.

Two keys llama.cpp's converter does not write for these families, because llama.cpp assumes
the full-size models' values, are written here so a 2-layer model can say what it is:
`attention.sliding_window_pattern` (Gemma 3: llama.cpp assumes 6) and `attention.scale`
(Gemma: llama.cpp assumes head_dim^-1/2 below 27B). And qwen3moe's layer with a dense MLP
(`mlp_only_layers`, which llama.cpp's qwen3moe does not support) is written under the dense
names `ffn_gate`/`ffn_up`/`ffn_down`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
from _gguf_fixtures import llama_cpp_permute
from safetensors.numpy import load_file

ARCH = {
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MixtralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Gemma2ForCausalLM": gguf.MODEL_ARCH.GEMMA2,
    "Gemma3ForCausalLM": gguf.MODEL_ARCH.GEMMA3,
    "Phi3ForCausalLM": gguf.MODEL_ARCH.PHI3,
    "Qwen2MoeForCausalLM": gguf.MODEL_ARCH.QWEN2MOE,
    "Qwen3MoeForCausalLM": gguf.MODEL_ARCH.QWEN3MOE,
}


def convert(folder: Path, out: Path) -> Path:
    """Write folder's checkpoint to `out` as GGUF (float32 tensors); returns `out`."""
    hf = json.loads((folder / "config.json").read_text())
    arch = ARCH[hf["architectures"][0]]
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    _write_hparams(writer, hf, arch)
    _write_vocab(writer, folder)
    for name, tensor in _gguf_tensors(load_file(str(folder / "model.safetensors")), hf, arch):
        writer.add_tensor(name, np.ascontiguousarray(tensor, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _write_hparams(w: gguf.GGUFWriter, hf: dict, arch: gguf.MODEL_ARCH) -> None:
    rope = hf.get("rope_parameters") or {}
    global_rope = rope.get("full_attention", rope)
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_block_count(hf["num_hidden_layers"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(hf["num_attention_heads"])
    w.add_head_count_kv(hf["num_key_value_heads"])
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_rope_freq_base(global_rope["rope_theta"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    if global_rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(global_rope["factor"])
    experts = hf.get("num_local_experts") or hf.get("num_experts")
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(hf["num_experts_per_tok"])
    if hf.get("moe_intermediate_size"):
        w.add_expert_feed_forward_length(hf["moe_intermediate_size"])
    if hf.get("shared_expert_intermediate_size"):
        w.add_expert_shared_feed_forward_length(hf["shared_expert_intermediate_size"])
    if arch in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3):
        if hf.get("attn_logit_softcapping"):
            w.add_attn_logit_softcapping(hf["attn_logit_softcapping"])
        if hf.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(hf["final_logit_softcapping"])
        w.add_sliding_window(hf["sliding_window"])
        w.add_attention_scale(hf["query_pre_attn_scalar"] ** -0.5)
    if arch == gguf.MODEL_ARCH.GEMMA3:
        w.add_sliding_window_pattern([t == "sliding_attention" for t in hf["layer_types"]])
    if arch == gguf.MODEL_ARCH.PHI3:
        original = hf["original_max_position_embeddings"]
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_sliding_window(hf.get("sliding_window") or 0)
        scale = hf["max_position_embeddings"] / original
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))


def _write_vocab(w: gguf.GGUFWriter, folder: Path) -> None:
    """The byte-level BPE of tokenizer.json, as convert's _set_vocab_gpt2 writes it."""
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    special = {t["content"] for t in tokenizer["added_tokens"]}
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab[config["bos_token"]])
    w.add_eos_token_id(vocab[config["eos_token"]])
    w.add_add_bos_token(bool(config.get("add_bos_token")))
    w.add_chat_template(config["chat_template"])


def _gguf_tensors(state: dict[str, np.ndarray], hf: dict, arch: gguf.MODEL_ARCH):
    layers = hf["num_hidden_layers"]
    names = gguf.get_tensor_name_map(arch, layers)
    dense_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, layers)
    experts = hf.get("num_local_experts") or hf.get("num_experts") or 0
    gemma = arch in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3)
    stacked: dict[str, list[np.ndarray]] = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and hf.get("tie_word_embeddings"):
            continue
        base, suffix = name.rsplit(".", 1)  # weight or bias
        if ".experts." in base:  # model.layers.N.<moe>.experts.E.<proj>: stack over E
            prefix, rest = base.split(".experts.", 1)
            expert, proj = rest.split(".", 1)
            stacked.setdefault(f"{prefix}.experts.{proj}", [None] * experts)[int(expert)] = tensor
            continue
        if arch == gguf.MODEL_ARCH.LLAMA and base.endswith("self_attn.q_proj"):
            tensor = llama_cpp_permute(tensor, hf["num_attention_heads"])
        elif arch == gguf.MODEL_ARCH.LLAMA and base.endswith("self_attn.k_proj"):
            tensor = llama_cpp_permute(tensor, hf["num_key_value_heads"])
        if gemma and name.endswith("norm.weight"):
            tensor = tensor + np.float32(1.0)
        gguf_name = names.get_name(base) or dense_names.get_name(base)
        yield f"{gguf_name}.{suffix}", tensor
    for base, tensors in stacked.items():
        yield f"{names.get_name(base)}.weight", np.stack(tensors)
    scaling = hf.get("rope_parameters") or {}
    if arch == gguf.MODEL_ARCH.PHI3 and scaling.get("rope_type") == "longrope":
        yield "rope_factors_long.weight", np.asarray(scaling["long_factor"], np.float32)
        yield "rope_factors_short.weight", np.asarray(scaling["short_factor"], np.float32)
