"""nanovllm's NumPy models against transformers on tiny random checkpoints: logits and greedy tokens.

One checkpoint per feature the loader and model must get right (Llama 3 and linear rope
scaling, GQA, Mistral, Qwen2 QKV bias, Qwen3 q/k norm with an odd head_dim, tied embeddings,
a sharded bf16 checkpoint). The oracle tests at the bottom prove that each feature moves the
logits far beyond the tolerance, so the parity tests cannot pass with the feature dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import BOS_ID, EOS_ID, KINDS, prompt_ids, train_tokenizer
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


@pytest.fixture(scope="module")
def loaded(checkpoint_factory):
    """kind -> nanovllm LoadedModel, loaded once per module."""
    from nanovllm.models import load_model

    models = {}

    def get(kind: str):
        if kind not in models:
            models[kind] = load_model(
                str(checkpoint_factory(kind)), device="cpu-reference", dtype="float32"
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
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    assert lm.config.head_dim == head_dim
    assert lm.config.tie_word_embeddings == hf.tie_word_embeddings
    assert lm.generation_config["eos_token_id"] == [EOS_ID, BOS_ID]
    text = "Readability counts. Café 🙂"
    assert lm.tokenizer.encode(text) == train_tokenizer().encode(text).ids
    assert lm.tokenizer.decode(train_tokenizer().encode(text).ids) == text


# --- The oracle itself: each feature must matter, or its parity test proves nothing. ---


def without_rope_scaling(path: Path) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(path)
    theta = config.rope_parameters["rope_theta"]
    config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
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


MUTATIONS = {
    "llama3": without_rope_scaling,
    "llama_linear": without_rope_scaling,
    "qwen2_bias": without_qkv_bias,
    "qwen3_qk_norm": without_qk_norm,
    "mistral": with_unit_norm_weights,
}


@pytest.mark.parametrize("kind", MUTATIONS)
def test_dropping_the_feature_changes_logits_and_tokens(kind, checkpoint_factory, oracle_run):
    model = MUTATIONS[kind](checkpoint_factory(kind))
    run = oracle_run(kind)
    assert np.abs(oracle_logits(model, prompt_ids()) - run.logits).max() > 1000 * TOLERANCE
    assert oracle_greedy(model, prompt_ids())[0] != run.greedy
