"""The offline API `LLM(model=...).generate(...)`: vLLM-shaped outputs, and bad input rejected
with a ValueError that says what is wrong, leaving no request or KV block behind."""

from __future__ import annotations

import pytest
from checkpoints import BOS_ID

from nanovllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, ignore_eos=True, max_tokens=6)


@pytest.fixture(scope="module")
def llm(checkpoint_factory) -> LLM:
    return LLM(str(checkpoint_factory("llama3")), device="cpu", block_size=4, num_blocks=128)


@pytest.fixture(scope="module")
def small_llm(checkpoint_factory) -> LLM:
    """Room for 32 tokens: the KV cache, not the model, limits the length."""
    return LLM(str(checkpoint_factory("llama3")), device="cpu", block_size=4, num_blocks=8)


def assert_clean(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert not llm.engine.has_unfinished_requests()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_blocks


# ---- outputs --------------------------------------------------------------------------------


def test_generate_returns_one_output_per_prompt_in_order(llm):
    prompts = ["Readability counts.", [BOS_ID, 40, 41, 42], "The quick brown fox"]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [out.prompt for out in outputs] == ["Readability counts.", None, "The quick brown fox"]
    assert outputs[0].prompt_token_ids == llm.tokenizer.encode("Readability counts.")
    assert outputs[0].prompt_token_ids[0] == BOS_ID
    assert outputs[1].prompt_token_ids == [BOS_ID, 40, 41, 42]
    for out, prompt in zip(outputs, prompts, strict=True):
        alone = llm.generate(prompt, GREEDY, use_tqdm=False)
        assert len(alone) == 1
        assert out.finished
        assert len(out.outputs) == 1
        completion = out.outputs[0]
        assert completion.token_ids == alone[0].outputs[0].token_ids
        assert len(completion.token_ids) == 6
        assert completion.text == llm.tokenizer.decode(completion.token_ids)
        assert completion.finish_reason == "length"
    assert_clean(llm)


def test_one_sampling_params_per_prompt(llm):
    params = [GREEDY, SamplingParams(temperature=0, ignore_eos=True, max_tokens=3)]
    outputs = llm.generate(["Simple is better", "than complex"], params, use_tqdm=False)
    assert [len(out.outputs[0].token_ids) for out in outputs] == [6, 3]


def test_n_outputs_per_prompt(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=4, ignore_eos=True)
    (out,) = llm.generate("Errors should never pass silently", params, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 4 for c in out.outputs)


def test_default_sampling_params_come_from_generation_config(llm):
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_p) == (0.7, 0.8)  # checkpoints.write_generation_config


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(max_tokens=0), ["max_tokens", "0"]),
        (dict(max_tokens=-3), ["max_tokens", "-3"]),
        (dict(max_tokens=2.5), ["max_tokens", "2.5"]),
        (dict(temperature=-0.1), ["temperature", "-0.1"]),
        (dict(top_p=0.0), ["top_p", "0.0"]),
        (dict(top_p=1.5), ["top_p", "1.5"]),
        (dict(top_p=-1), ["top_p", "-1"]),
        (dict(n=0), ["n ", "0"]),
        (dict(n=-2), ["n ", "-2"]),
    ],
)
def test_bad_sampling_params_raise_value_error_naming_the_field(kwargs, words):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_a_prompt_longer_than_the_model_raises_with_both_lengths(llm):
    limit = llm.engine.max_model_len
    assert limit == 256  # the checkpoint's max_position_embeddings
    with pytest.raises(ValueError) as info:
        llm.generate([[5] * 300], GREEDY, use_tqdm=False)
    assert "300" in str(info.value) and "256" in str(info.value)
    with pytest.raises(ValueError) as info:
        llm.generate([[5] * 256], GREEDY, use_tqdm=False)  # leaves no room for one token
    assert "256" in str(info.value)
    assert_clean(llm)


def test_a_prompt_longer_than_the_kv_cache_raises_with_both_lengths(small_llm):
    assert small_llm.engine.max_model_len == 32
    with pytest.raises(ValueError) as info:
        small_llm.generate([[5] * 40], GREEDY, use_tqdm=False)
    assert "40" in str(info.value) and "32" in str(info.value)


def test_max_tokens_beyond_the_model_length_raises_with_the_lengths(small_llm):
    with pytest.raises(ValueError) as info:
        small_llm.generate([[5] * 20], SamplingParams(max_tokens=20, temperature=0), use_tqdm=False)
    message = str(info.value)
    assert "32" in message and "40" in message and "20" in message


@pytest.mark.parametrize("prompt", ["", []], ids=["empty string", "empty id list"])
def test_an_empty_prompt_raises(llm, prompt):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([prompt], GREEDY, use_tqdm=False)
    assert_clean(llm)


@pytest.mark.parametrize("bad_id", [-1, 320, 10**9])
def test_token_ids_outside_the_vocabulary_raise(llm, bad_id):
    vocab = llm.engine.model_config.vocab_size
    assert vocab == 320
    with pytest.raises(ValueError) as info:
        llm.generate([[BOS_ID, 7, bad_id]], GREEDY, use_tqdm=False)
    assert str(bad_id) in str(info.value)
    assert "vocabulary" in str(info.value) and str(vocab) in str(info.value)


def test_a_mismatched_number_of_sampling_params_raises(llm):
    with pytest.raises(ValueError, match="2 sampling params for 3 prompts"):
        llm.generate(["a", "b", "c"], [GREEDY, GREEDY], use_tqdm=False)


def test_a_rejected_prompt_leaves_no_request_or_block_behind(llm):
    before = [
        out.outputs[0].token_ids for out in llm.generate(["Readability"], GREEDY, use_tqdm=False)
    ]
    with pytest.raises(ValueError):
        llm.generate(["Readability", "counts", ""], GREEDY, use_tqdm=False)
    assert_clean(llm)
    after = [
        out.outputs[0].token_ids for out in llm.generate(["Readability"], GREEDY, use_tqdm=False)
    ]
    assert after == before
