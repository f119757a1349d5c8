"""Tiny random Hugging Face checkpoints, built locally with transformers, for tests.

Each kind is a complete model folder: config.json, *.safetensors, tokenizer.json (a byte-level
BPE trained here on built-in text), tokenizer_config.json (bos/eos + a ChatML chat template)
and generation_config.json. Weights are drawn larger than transformers' default init, with
norms away from 1 and biases away from 0, so the logits are decisive and a dropped norm, bias
or rope scaling changes the greedy tokens.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

BOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, IM_START, IM_END]  # ids 0, 1, 2
BOS_ID, EOS_ID = 0, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOKENIZER_VOCAB = 320

CORPUS = """\
Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex.
Readability counts. Errors should never pass silently, unless explicitly silenced.
The quick brown fox jumps over the lazy dog while the lazy dog sleeps in the sun.
A paged KV cache stores keys and values in fixed-size blocks. The scheduler admits requests
while blocks remain, and preempts the newest request when they run out. Prefix caching keeps
full blocks keyed by the hash of their tokens, so a shared system prompt is computed once.
def greedy(logits): return int(logits.argmax())  # numbers 0 1 2 3 42 1024 3.14159
Café, naïve, Zürich, 東京, emoji 🙂 — a byte-level tokenizer never meets an unknown character.
"""

KINDS = (
    "llama3",
    "llama_linear",
    "mistral",
    "qwen2_bias",
    "qwen3_qk_norm",
    "tied",
    "bf16_sharded",
    "gemma2",
    "gemma3",
    "phi3",
    "mixtral",
    "qwen3_moe",
    "qwen2_moe",
)
WINDOW = 8  # the sliding window of the windowed kinds: shorter than every test prompt

SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=None,
)


@dataclass(frozen=True, slots=True)
class Spec:
    make_config: Callable[[int], PretrainedConfig]
    seed: int
    vocab_extra: int = 0  # real models pad the embedding past the tokenizer's vocabulary
    bf16_shards: bool = False
    legacy_config: bool = False


def _llama3(vocab: int) -> PretrainedConfig:
    # head_dim 16, theta 5e5: wavelengths 6, 33, 172, ... so with an original context of 64
    # one frequency is kept, one smoothed and the rest divided by the factor.
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    return LlamaConfig(vocab_size=vocab, num_key_value_heads=2, rope_parameters=rope, **SMALL)


def _llama_linear(vocab: int) -> PretrainedConfig:
    rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    return LlamaConfig(vocab_size=vocab, num_key_value_heads=4, rope_parameters=rope, **SMALL)


def _mistral(vocab: int) -> PretrainedConfig:
    return MistralConfig(
        vocab_size=vocab, num_key_value_heads=2, rms_norm_eps=1e-5, sliding_window=WINDOW, **SMALL
    )


def _gemma2(vocab: int) -> PretrainedConfig:
    # Layer 0 slides, layer 1 is global. The caps are low enough to bind on these weights, and
    # query_pre_attn_scalar differs from head_dim, so each of them moves the logits.
    return Gemma2Config(
        vocab_size=vocab, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
        query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=15.0,
        **SMALL,
    )  # fmt: skip


def _gemma3(vocab: int) -> PretrainedConfig:
    # Sliding layers rotate with base 10^4, the global one with 10^6 scaled linearly by 8.
    rope = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
    }
    return Gemma3TextConfig(
        vocab_size=vocab, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"], rope_parameters=rope,
        query_pre_attn_scalar=24, final_logit_softcapping=15.0, **SMALL,
    )  # fmt: skip


# LongRoPE's per-frequency factors (head_dim 16: 8 frequencies). Short ones apply up to the
# pretraining length of 64 tokens, long ones beyond.
PHI3_ORIGINAL_LENGTH = 64


def _phi3(vocab: int) -> PretrainedConfig:
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0],
        "long_factor": [1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0],
        "original_max_position_embeddings": PHI3_ORIGINAL_LENGTH,
    }
    return Phi3Config(
        vocab_size=vocab, num_key_value_heads=2, rope_parameters=rope,
        original_max_position_embeddings=PHI3_ORIGINAL_LENGTH, sliding_window=12, **SMALL,
    )  # fmt: skip


def _mixtral(vocab: int) -> PretrainedConfig:
    small = SMALL | {"intermediate_size": 48}
    return MixtralConfig(
        vocab_size=vocab, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        **small,
    )  # fmt: skip


def _qwen3_moe(vocab: int) -> PretrainedConfig:
    # Layer 1 keeps a dense MLP (mlp_only_layers); top-k weights renormalized.
    return Qwen3MoeConfig(
        vocab_size=vocab, num_key_value_heads=2, head_dim=16, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        mlp_only_layers=[1], **SMALL,
    )  # fmt: skip


def _qwen2_moe(vocab: int) -> PretrainedConfig:
    # A shared expert behind a sigmoid gate; top-k weights not renormalized.
    return Qwen2MoeConfig(
        vocab_size=vocab, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, norm_topk_prob=False,
        **SMALL,
    )  # fmt: skip


def _qwen2(vocab: int) -> PretrainedConfig:
    rope = {"rope_type": "default", "rope_theta": 1000000.0}
    return Qwen2Config(vocab_size=vocab, num_key_value_heads=2, rope_parameters=rope, **SMALL)


def _qwen3(vocab: int) -> PretrainedConfig:
    # head_dim 32 != 64 / 4: q_proj is 64 -> 128 and o_proj 128 -> 64.
    return Qwen3Config(vocab_size=vocab, num_key_value_heads=2, head_dim=32, **SMALL)


def _tied(vocab: int) -> PretrainedConfig:
    return LlamaConfig(vocab_size=vocab, num_key_value_heads=1, tie_word_embeddings=True, **SMALL)


def _llama3_long(vocab: int) -> PretrainedConfig:
    # The llama3 kind with room for long generations (server tests of long streams); a
    # random model's position limit costs nothing until the tokens exist.
    config = _llama3(vocab)
    config.max_position_embeddings = 8192
    return config


SPECS: dict[str, Spec] = {
    "llama3": Spec(_llama3, seed=1),
    "llama_linear": Spec(_llama_linear, seed=2, legacy_config=True),
    "mistral": Spec(_mistral, seed=3),
    "qwen2_bias": Spec(_qwen2, seed=4, vocab_extra=64),
    "qwen3_qk_norm": Spec(_qwen3, seed=5),
    "tied": Spec(_tied, seed=6),
    "bf16_sharded": Spec(_qwen2, seed=7, bf16_shards=True),
    "gemma2": Spec(_gemma2, seed=8),
    "gemma3": Spec(_gemma3, seed=9),
    "phi3": Spec(_phi3, seed=10),
    "mixtral": Spec(_mixtral, seed=11),
    "qwen3_moe": Spec(_qwen3_moe, seed=12),
    "qwen2_moe": Spec(_qwen2_moe, seed=13),
    "llama3_long": Spec(_llama3_long, seed=1),  # not in KINDS: the same model as llama3
}


def build_checkpoint(kind: str, folder: Path) -> Path:
    """Write the checkpoint `kind` (one of KINDS) into `folder` and return the folder."""
    spec = SPECS[kind]
    tokenizer = train_tokenizer()
    vocab = tokenizer.get_vocab_size() + spec.vocab_extra
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(spec.make_config(vocab), dtype=torch.float32)
    randomize_weights(model)
    if spec.bf16_shards:
        model = model.to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    # About half the bf16 weights per shard, so exactly two shards and an index.
    shard = "150KB" if spec.bf16_shards else "1GB"
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=shard)
    write_tokenizer(tokenizer, folder)
    write_generation_config(folder)
    if spec.legacy_config:
        rewrite_config_legacy(folder / "config.json")
    return folder


@torch.no_grad()
def randomize_weights(model: torch.nn.Module) -> None:
    """Draw weights so activations stay O(1) but attention and logits are far from uniform."""
    # Gemma: embeddings are scaled by sqrt(hidden) = 8 and every sublayer's output is normalized
    # before its residual add, so with the usual draws the token's own (tied) embedding would
    # dominate the last layer and greedy decoding would repeat the input. Norm factors (1 + w)
    # of 4 to 5 and smaller embeddings let the layers speak.
    gemma = model.config.model_type.startswith("gemma")
    norm_low, embed_std = (3.0, 0.15) if gemma else (0.5, 0.5)
    for name, param in model.named_parameters():
        if gemma and name.endswith(("q_norm.weight", "k_norm.weight")):
            param.uniform_(-0.5, 0.5)  # q and k near unit scale: float16 scores stay accurate
        elif name.endswith("norm.weight"):
            param.uniform_(norm_low, norm_low + 1.0)
        elif name.endswith((".gate.weight", "shared_expert_gate.weight")):
            # MoE routers: decisive scores, so no token's top-k is a near-tie.
            param.normal_(0.0, 4.0 / math.sqrt(param.shape[1]))
        elif name.endswith("bias"):
            param.normal_(0.0, 0.5)
        elif "embed_tokens" in name:
            # Also the LM head when tied: 0.5 * sqrt(64) gives logits of std ~4.
            param.normal_(0.0, embed_std)
        elif "lm_head" in name:
            param.normal_(0.0, 4.0 / math.sqrt(param.shape[1]))
        else:
            param.normal_(0.0, 1.5 / math.sqrt(param.shape[1]))


@functools.cache
def train_tokenizer() -> Tokenizer:
    """A byte-level BPE that prepends BOS, like Llama's tokenizers."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    return tokenizer


def write_tokenizer(tokenizer: Tokenizer, folder: Path) -> None:
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": IM_END,
        "pad_token": BOS,
        "add_bos_token": True,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": SMALL["max_position_embeddings"],
    }
    _write_json(folder / "tokenizer_config.json", config)


def write_generation_config(folder: Path) -> None:
    config = {
        "bos_token_id": BOS_ID,
        "eos_token_id": [EOS_ID, BOS_ID],
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
    }
    _write_json(folder / "generation_config.json", config)


def rewrite_config_legacy(path: Path) -> None:
    """Turn transformers 5's config.json layout into the older one most Hub checkpoints use."""
    config = json.loads(path.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    config["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype")
    _write_json(path, config)


def prompt_ids(length: int = 24) -> list[int]:
    """`length` token ids of a fixed English prompt, starting with BOS."""
    text = "Beautiful is better than ugly. The scheduler admits requests while blocks remain."
    ids = train_tokenizer().encode(text).ids
    assert len(ids) >= length, f"prompt too short: {len(ids)} tokens"
    return ids[:length]


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def perturbed_copy(source: Path, folder: Path, scale: float, seed: int) -> Path:
    """The source model with every weight jittered by scale * its std: a draft that agrees with
    the target often but not always, like a real one."""
    from safetensors.numpy import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for path in source.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, folder / path.name)
            continue
        weights = load_file(path)
        for name, w in weights.items():
            noise = rng.standard_normal(w.shape) * scale * float(w.std())
            weights[name] = (w + noise).astype(w.dtype)
        save_file(weights, folder / path.name, metadata={"format": "pt"})
    return folder
