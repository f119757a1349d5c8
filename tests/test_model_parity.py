"""nanovllm's NumPy models against transformers on tiny random checkpoints: logits and greedy tokens.

One checkpoint per feature the loader and model must get right (Llama 3 and linear rope
scaling, GQA, Mistral's sliding window, Qwen2 QKV bias, Qwen3 q/k norm with an odd head_dim,
tied embeddings, a sharded bf16 checkpoint, Gemma 2 and 3, Phi-3's fused weights and LongRoPE,
Mixtral, Qwen3-MoE and Qwen2-MoE). The prompt (24 tokens) is longer than every sliding window
(8 or 12). The oracle tests at the bottom prove that each feature moves the logits far beyond
the tolerance, so the parity tests cannot pass with the feature dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import BOS_ID, EOS_ID, KINDS, PHI3_ORIGINAL_LENGTH, prompt_ids, train_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

TOLERANCE = 1e-4
NEW_TOKENS = 32


@dataclass(slots=True)
class OracleRun:
    logits: np.ndarray  # [T, vocab] on the prompt
    greedy: list[int]
    path_margins: np.ndarray  # top-1 minus top-2 logit at each greedy step


def load_oracle(path: Path, config=None) -> torch.nn.Module:
    kwargs = {} if config is None else {"config": config}
    # float32 also for the bf16 checkpoint: bf16 values are exact in float32.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    return model.eval()


@torch.no_grad()
def oracle_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].numpy()


@torch.no_grad()
def oracle_greedy(model: torch.nn.Module, ids: list[int]) -> tuple[list[int], np.ndarray]:
    input_ids = torch.tensor([ids])
    out = model.generate(
        input_ids,
        # Explicit: generate() would otherwise mask every pad_token_id in the prompt.
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=None,  # no EOS stopping: exactly NEW_TOKENS tokens, as lm.greedy
        pad_token_id=EOS_ID,
        output_logits=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[0, len(ids) :].tolist()
    assert len(new) == NEW_TOKENS
    return new, top1_margins(torch.cat(out.logits).numpy())


def top1_margins(logits: np.ndarray) -> np.ndarray:
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


@pytest.fixture(scope="module")
def oracle_run(checkpoint_factory):
    runs: dict[str, OracleRun] = {}

    def get(kind: str) -> OracleRun:
        if kind not in runs:
            model = load_oracle(checkpoint_factory(kind))
            greedy, margins = oracle_greedy(model, prompt_ids())
            runs[kind] = OracleRun(oracle_logits(model, prompt_ids()), greedy, margins)
        return runs[kind]

    return get


# Phi-3 up to its pretraining length: LongRoPE's short factors, which is what transformers uses
# while a sequence (prompt + 32 tokens) stays that short. The long factors are tested below.
LOAD_ARGS = {"phi3": dict(max_model_len=PHI3_ORIGINAL_LENGTH)}


@pytest.fixture(scope="module")
def loaded(checkpoint_factory):
    """kind -> nanovllm LoadedModel, loaded once per module."""
    from nanovllm.models import load_model

    models = {}

    def get(kind: str):
        if kind not in models:
            path = str(checkpoint_factory(kind))
            models[kind] = load_model(
                path, device="cpu-reference", dtype="float32", **LOAD_ARGS.get(kind, {})
            )
        return models[kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_oracle_logits_are_decisive(kind, oracle_run):
    """Fixture sanity: logits are far from uniform and no greedy step is a near-tie."""
    run = oracle_run(kind)
    assert run.greedy[0] == run.logits[-1].argmax(), "generate() disagrees with the forward pass"
    assert top1_margins(run.logits).max() > 1.0
    # A logit error within TOLERANCE cannot flip any greedy choice.
    assert run.path_margins.min() > 2 * TOLERANCE
    assert len(set(run.greedy)) > NEW_TOKENS // 4, "greedy output degenerated into a loop"


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(kind, loaded, oracle_run):
    expected = oracle_run(kind).logits
    logits = np.asarray(loaded(kind).logits(prompt_ids()))
    assert logits.shape == expected.shape
    assert logits.dtype == np.float32
    diff = float(np.abs(logits - expected).max())
    print(f"{kind}: max abs logit diff {diff:.3g}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_match_transformers(kind, loaded, oracle_run):
    tokens = loaded(kind).greedy(prompt_ids(), NEW_TOKENS)
    assert list(tokens) == oracle_run(kind).greedy


@pytest.mark.parametrize("kind", KINDS)
def test_loaded_config_and_tokenizer_match_checkpoint(kind, loaded, checkpoint_factory):
    lm = loaded(kind)
    hf = AutoConfig.from_pretrained(checkpoint_factory(kind))
    assert lm.config.vocab_size == hf.vocab_size
    assert lm.config.num_kv_heads == hf.num_key_value_heads
    assert lm.config.sliding_window == (getattr(hf, "sliding_window", None) or None)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    assert lm.config.head_dim == head_dim
    assert lm.config.tie_word_embeddings == hf.tie_word_embeddings
    assert lm.generation_config["eos_token_id"] == [EOS_ID, BOS_ID]
    text = "Readability counts. Café 🙂"
    assert lm.tokenizer.encode(text) == train_tokenizer().encode(text).ids
    assert lm.tokenizer.decode(train_tokenizer().encode(text).ids) == text


def test_phi3_past_its_pretraining_length_uses_the_long_factors_like_transformers(
    checkpoint_factory,
):
    """A context allowed past the pretraining length takes LongRoPE's long factors; transformers
    takes them for every forward pass whose sequence is longer, so an 80-token prompt matches."""
    from nanovllm.models import load_model

    path = checkpoint_factory("phi3")
    prompt = np.random.default_rng(0).integers(3, 320, PHI3_ORIGINAL_LENGTH + 16).tolist()
    model = load_oracle(path)
    expected = oracle_logits(model, prompt)
    greedy, margins = oracle_greedy(model, prompt)
    assert margins.min() > 2 * TOLERANCE
    lm = load_model(str(path), device="cpu", dtype="float32")
    assert lm.max_positions > PHI3_ORIGINAL_LENGTH
    assert float(np.abs(lm.logits(prompt) - expected).max()) <= TOLERANCE
    assert lm.greedy(prompt, NEW_TOKENS) == greedy


# --- The oracle itself: each feature must matter, or its parity test proves nothing. ---


def with_config(**changes):
    """A mutation that loads the checkpoint with config attributes changed."""

    def load(path: Path) -> torch.nn.Module:
        config = AutoConfig.from_pretrained(path)
        for key, value in changes.items():
            setattr(config, key, value)
        return load_oracle(path, config)

    return load


def without_rope_scaling(path: Path) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(path)
    theta = config.rope_parameters["rope_theta"]
    config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    return load_oracle(path, config)


def with_global_rope_on_sliding_layers(path: Path) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(path)
    config.rope_parameters["sliding_attention"] = dict(config.rope_parameters["full_attention"])
    return load_oracle(path, config)


@torch.no_grad()
def without_qkv_bias(path: Path) -> torch.nn.Module:
    model = load_oracle(path)
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.bias.zero_()
    return model


def without_qk_norm(path: Path) -> torch.nn.Module:
    model = load_oracle(path)
    for layer in model.model.layers:
        layer.self_attn.q_norm = torch.nn.Identity()
        layer.self_attn.k_norm = torch.nn.Identity()
    return model


@torch.no_grad()
def with_unit_norm_weights(path: Path) -> torch.nn.Module:
    model = load_oracle(path)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
    return model


@torch.no_grad()
def without_shared_expert(path: Path) -> torch.nn.Module:
    model = load_oracle(path)
    for layer in model.model.layers:
        layer.mlp.shared_expert.down_proj.weight.zero_()
    return model


MUTATIONS = {
    "llama3-rope_scaling": without_rope_scaling,
    "llama_linear-rope_scaling": without_rope_scaling,
    "qwen2_bias-qkv_bias": without_qkv_bias,
    "qwen3_qk_norm-qk_norm": without_qk_norm,
    "mistral-norm_weights": with_unit_norm_weights,
    "mistral-sliding_window": with_config(sliding_window=None),
    "gemma2-sliding_window": with_config(layer_types=["full_attention"] * 2),
    "gemma2-attn_softcap": with_config(attn_logit_softcapping=None),
    "gemma2-final_softcap": with_config(final_logit_softcapping=None),
    "gemma2-query_pre_attn_scalar": with_config(query_pre_attn_scalar=16),
    "gemma3-sliding_window": with_config(layer_types=["full_attention"] * 2),
    "gemma3-local_rope_base": with_global_rope_on_sliding_layers,
    "gemma3-qk_norm": without_qk_norm,
    "phi3-longrope": without_rope_scaling,
    "phi3-sliding_window": with_config(sliding_window=None),
    "mixtral-top_k": with_config(num_experts_per_tok=1),
    "qwen3_moe-norm_topk_prob": with_config(norm_topk_prob=False),
    "qwen2_moe-norm_topk_prob": with_config(norm_topk_prob=True),
    "qwen2_moe-shared_expert": without_shared_expert,
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_dropping_the_feature_changes_logits_and_tokens(mutation, checkpoint_factory, oracle_run):
    kind = mutation.split("-")[0]
    model = MUTATIONS[mutation](checkpoint_factory(kind))
    run = oracle_run(kind)
    assert np.abs(oracle_logits(model, prompt_ids()) - run.logits).max() > 1000 * TOLERANCE
    if mutation not in MONOTONIC:
        assert oracle_greedy(model, prompt_ids())[0] != run.greedy


# Capping the final logits keeps their order: it changes probabilities, never greedy tokens.
MONOTONIC = {"gemma2-final_softcap"}
