"""Sliding-window models hold only their window's KV blocks: blocks wholly before the window of a
sequence's next query go back to the pool (nanovllm/engine/block_manager.py `release_before`),
so a sequence far longer than the KV cache decodes with the same tokens as the single-sequence
reference, and blocks are still accounted exactly."""

from __future__ import annotations

import pytest
from checkpoints import WINDOW, prompt_ids

from nanovllm import LLM, SamplingParams
from nanovllm.engine.assembly import attention_window
from nanovllm.engine.block_manager import HOLE
from nanovllm.models.loader import load_checkpoint, load_model

BLOCK, BUDGET = 4, 16
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def mistral(checkpoint_factory) -> str:
    return str(checkpoint_factory("mistral"))  # every layer attends through a window of 8


def small_cache_llm(path: str, **kwargs) -> LLM:
    # 12 blocks of 4 tokens: 48 tokens of cache, enough for the window, a step and one spare.
    args = dict(device="cpu", block_size=BLOCK, num_blocks=12, max_num_batched_tokens=BUDGET)
    return LLM(path, **(args | kwargs))


def test_only_a_model_windowed_on_every_layer_releases_blocks(checkpoint_factory, mistral):
    assert attention_window([load_checkpoint(mistral).config]) == WINDOW
    gemma = load_checkpoint(str(checkpoint_factory("gemma2"))).config  # alternates global layers
    assert attention_window([gemma]) == 0
    assert attention_window([load_checkpoint(mistral).config, gemma]) == 0


def test_a_sequence_longer_than_the_cache_decodes_like_the_reference(mistral):
    llm = small_cache_llm(mistral)
    prompt, new_tokens = prompt_ids(20), 100  # 120 tokens against 48 tokens of cache
    assert llm.engine.max_model_len > 120
    engine = llm.engine
    engine.add_request("long", prompt, SamplingParams(max_tokens=new_tokens, **GREEDY))
    seq = engine.requests["long"].seqs[0]
    most_held = 0
    while engine.has_unfinished_requests():
        engine.step()
        if not seq.is_finished:
            most_held = max(most_held, engine.block_manager.held_blocks(seq))
            live = [b for b in seq.block_table if b != HOLE]
            assert seq.block_table[: seq.num_released_blocks] == [HOLE] * seq.num_released_blocks
            assert all(engine.block_manager.blocks[b].ref_count >= 1 for b in live)
    want = load_model(mistral).greedy(prompt, new_tokens)
    assert seq.output_token_ids == want
    assert most_held <= -(-(WINDOW + BUDGET) // BLOCK) + 2
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_windowed_sequences_batched_with_shared_prefixes_and_preemption_stay_exact(mistral):
    llm = small_cache_llm(mistral, max_num_seqs=3, num_blocks=8)
    base = prompt_ids(24)
    prompts = [base[:16] + base[i : i + 4] for i in range(4)] + [base[:9]]
    params = SamplingParams(max_tokens=40, **GREEDY)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    reference = load_model(mistral)
    assert [o.outputs[0].token_ids for o in outputs] == [reference.greedy(p, 40) for p in prompts]
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert stats.num_free_blocks == stats.num_blocks


def test_a_draft_model_that_catches_up_later_keeps_the_blocks_it_has_not_read(mistral):
    # The draft runs only when the target decodes, from where it stopped: after a prompt
    # prefilled in chunks it reads the whole prompt, so nothing below its own next query may be
    # released. The draft is the target itself: every guess is accepted.
    llm = small_cache_llm(mistral, draft_model=mistral, num_speculative_tokens=2)
    prompt, new_tokens = prompt_ids(20), 24  # chunks of 16 and 4 tokens before the first decode
    out = llm.generate([prompt], SamplingParams(max_tokens=new_tokens, **GREEDY), use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == load_model(mistral).greedy(prompt, new_tokens)
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks
    assert stats.spec.num_accepted_tokens == stats.spec.num_draft_tokens > 0
