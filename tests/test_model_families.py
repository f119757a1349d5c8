"""The families added on the Llama decoder (Mistral's sliding window, Gemma 2 and 3, Phi-3,
Mixtral, Qwen3-MoE, Qwen2-MoE) through the whole engine: batched with other sequences, prefilled
in chunks and preempted, their greedy tokens are transformers' greedy tokens for each prompt
alone. With a sliding-window model, speculative decoding and prefix caching stay exact.

Every prompt here is longer than the windows (8, or 12 for Phi-3) of tests/checkpoints.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoints import EOS_ID, PHI3_ORIGINAL_LENGTH

from nanovllm import LLM, SamplingParams
from nanovllm.errors import ModelLoadError
from nanovllm.models.registry import ARCHITECTURES, model_class

FAMILIES = ["mistral", "gemma2", "gemma3", "phi3", "mixtral", "qwen3_moe", "qwen2_moe"]
NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0, ignore_eos=True, max_tokens=NEW_TOKENS)
# Phi-3 stays within its pretraining length (LongRoPE's short factors, as in transformers).
ENGINE_ARGS = {"phi3": dict(max_model_len=PHI3_ORIGINAL_LENGTH)}
# Where every layer slides, a sequence holds only the blocks of its window (blocks below it are
# released), so the cache must be smaller for the batch to outgrow it.
NUM_BLOCKS = {"mistral": 12, "phi3": 12}


def random_prompts(lengths, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 320, size=n).tolist() for n in lengths]


# Six prompts of 13 to 30 tokens (32 more each: at most 62 < Phi-3's 64), on 24 blocks of 4
# tokens (NUM_BLOCKS where every layer slides) with 4 sequences at a time: the batch outgrows the cache and sequences are preempted;
# a 16-token step budget prefills the longer prompts in chunks next to running decodes.
PROMPTS = random_prompts([13, 30, 17, 22, 14, 26], seed=7)


@torch.no_grad()
def hf_greedy(model, prompt: list[int]) -> list[int]:
    input_ids = torch.tensor([prompt])
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        eos_token_id=None,
        pad_token_id=EOS_ID,
    )
    return out[0, len(prompt) :].tolist()


def token_ids(outputs) -> list[list[int]]:
    return [list(out.outputs[0].token_ids) for out in outputs]


@pytest.mark.parametrize("kind", FAMILIES)
def test_batched_chunked_and_preempted_greedy_equals_transformers(checkpoint_factory, kind):
    from transformers import AutoModelForCausalLM

    path = checkpoint_factory(kind)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = [hf_greedy(hf, prompt) for prompt in PROMPTS]
    assert len({tuple(e) for e in expected}) == len(PROMPTS)
    llm = LLM(
        str(path), device="cpu", block_size=4, num_blocks=NUM_BLOCKS.get(kind, 24), max_num_seqs=4,
        max_num_batched_tokens=16, **ENGINE_ARGS.get(kind, {}),
    )  # fmt: skip
    assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0
    assert stats.num_free_blocks == NUM_BLOCKS.get(kind, 24)


# ---- a sliding-window model with speculation and prefix caching ----------------------------
# Gemma 2: layer 0 slides over 8 tokens, layer 1 is global.
SPEC_PROMPTS = random_prompts([21, 11, 34], seed=8)


@pytest.fixture(scope="module")
def window_model(checkpoint_factory) -> str:
    return str(checkpoint_factory("gemma2"))


@pytest.fixture(scope="module")
def plain_outputs(window_model) -> list[list[int]]:
    llm = LLM(window_model, device="cpu", block_size=4, enable_prefix_caching=False)
    return token_ids(llm.generate(SPEC_PROMPTS, GREEDY, use_tqdm=False))


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_speculative_decoding_with_a_sliding_window_equals_plain_decoding(
    window_model, plain_outputs, proposer
):
    # The draft is the model itself: every draft is accepted, so verification runs k + 1 query
    # tokens per sequence through the windowed layers at every step.
    spec = (
        dict(speculative_method="ngram") if proposer == "ngram" else dict(draft_model=window_model)
    )
    llm = LLM(window_model, device="cpu", block_size=4, num_speculative_tokens=3, **spec)
    assert token_ids(llm.generate(SPEC_PROMPTS, GREEDY, use_tqdm=False)) == plain_outputs
    stats = llm.engine.stats().spec
    assert stats.num_draft_tokens > 0
    if proposer == "draft":
        assert stats.num_accepted_tokens == stats.num_draft_tokens


def test_prefix_cached_blocks_of_a_sliding_window_model_give_the_same_tokens(
    window_model, plain_outputs
):
    llm = LLM(window_model, device="cpu", block_size=4)
    first = token_ids(llm.generate(SPEC_PROMPTS[:1], GREEDY, use_tqdm=False))
    before = llm.engine.stats()
    again = token_ids(llm.generate(SPEC_PROMPTS, GREEDY, use_tqdm=False))
    after = llm.engine.stats()
    # The first prompt's 5 full blocks (20 of 21 tokens) are served from the cache.
    assert after.prefix_cache_hits - before.prefix_cache_hits >= 20
    assert first == plain_outputs[:1]
    assert again == plain_outputs


# ---- the registry ----------------------------------------------------------------------------
def test_an_unknown_architecture_is_refused_with_the_full_supported_list():
    with pytest.raises(ModelLoadError) as error:
        model_class("GPTNeoXForCausalLM")
    message = str(error.value)
    assert "'GPTNeoXForCausalLM' is not supported" in message
    for name in ARCHITECTURES:
        assert name in message
    assert len(ARCHITECTURES) == 10


def test_mistral_max_model_len_is_not_capped_to_its_window(checkpoint_factory):
    llm = LLM(str(checkpoint_factory("mistral")), device="cpu", block_size=4, num_blocks=128)
    assert llm.engine.max_model_len == 256  # max_position_embeddings; the window is 8


# ---- config.json without layer_types (transformers 4 checkpoints) ----------------------------
LEGACY_CONFIGS = {
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(num_hidden_layers=5, sliding_window=7)),
    "gemma3_default_pattern": (
        "Gemma3ForCausalLM", "Gemma3TextConfig", dict(num_hidden_layers=13, sliding_window=7),
    ),
    "gemma3_pattern_3": (
        "Gemma3ForCausalLM", "Gemma3TextConfig",
        dict(num_hidden_layers=7, sliding_window=7, sliding_window_pattern=3),
    ),
    "qwen2_max_window_layers": (
        "Qwen2ForCausalLM", "Qwen2Config",
        dict(num_hidden_layers=6, use_sliding_window=True, max_window_layers=4, sliding_window=9),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", LEGACY_CONFIGS)
def test_sliding_layers_of_a_config_without_layer_types_are_transformers(case):
    """transformers derives layer_types when config.json lacks them; so must we."""
    import transformers

    from nanovllm.models.model_config import ModelConfig

    architecture, config_class, kwargs = LEGACY_CONFIGS[case]
    hf = getattr(transformers, config_class)(**kwargs).to_dict()
    expected = hf.pop("layer_types")
    hf["architectures"] = [architecture]
    config = ModelConfig.from_hf(hf)
    assert [config.window(i) for i in range(config.num_layers)] == [
        hf["sliding_window"] if t == "sliding_attention" else 0 for t in expected
    ]
