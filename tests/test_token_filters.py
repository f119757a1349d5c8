"""logit_bias, allowed_token_ids and bad_words: SamplingParams' checks and the per-step operations,
checked against direct per-token statements of vLLM's rules (and the real SmolLM2 and Qwen2.5
tokenizers for bad words)."""

from __future__ import annotations

import numpy as np
import pytest
from _structured_fixtures import MODELS, compiler

from nanovllm.engine.logits_processors import apply_logit_bias
from nanovllm.sampling_params import SamplingParams
from nanovllm.structured.bitmask import allocate_bitmask, allowed_tokens, apply_token_bitmask
from nanovllm.structured.params import StructuredOutputsParams
from nanovllm.structured.token_filters import (
    AllOf,
    AllowedTokens,
    BadWords,
    combine,
    tokenize_bad_words,
)


# ---- SamplingParams --------------------------------------------------------------------------
def test_logit_bias_takes_string_ids_and_clamps_values() -> None:
    params = SamplingParams(logit_bias={"5": 250, 7: -3.5, "9": -1000})
    assert params.logit_bias == {5: 100.0, 7: -3.5, 9: -100.0}
    assert params.clone(temperature=0.5).logit_bias == params.logit_bias


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(logit_bias={"x": 1}), "logit_bias key 'x' is not a token id"),
        (dict(logit_bias={"-3": 1}), "logit_bias key '-3' is not a token id"),
        (dict(logit_bias={"1.5": 1}), "logit_bias key '1.5' is not a token id"),
        (dict(logit_bias={"1": "high"}), "must be a finite number"),
        (dict(logit_bias={"1": float("inf")}), "must be a finite number"),
        (dict(logit_bias=[1, 2]), "logit_bias must map token ids to numbers"),
        (dict(allowed_token_ids=[]), "allowed_token_ids must not be empty"),
        (dict(allowed_token_ids=[1, -2]), "allowed_token_ids must be at least 0"),
        (dict(bad_words=["ok", " "]), "bad_words must be a list of non-empty strings"),
        (dict(structured_outputs={"regex": "a"}), "structured_outputs must be a"),
    ],
)
def test_bad_token_fields_are_refused_by_name(fields, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        SamplingParams(**fields)


def test_token_ids_are_checked_against_the_model_vocabulary() -> None:
    params = SamplingParams(logit_bias={"10": 1, "99": 1}, allowed_token_ids=[1, 120])
    with pytest.raises(ValueError, match="logit_bias has token id.s. 99 outside"):
        params.validate_token_ids(50)
    with pytest.raises(ValueError, match="allowed_token_ids has token id.s. 120 outside"):
        params.validate_token_ids(100)
    params.validate_token_ids(121)


def test_bad_words_are_deduplicated_in_order() -> None:
    assert SamplingParams(bad_words=["b", "a", "b"]).bad_words == ["b", "a"]


def test_structured_outputs_rides_on_sampling_params() -> None:
    so = StructuredOutputsParams(choice=["a", "b"])
    assert SamplingParams(structured_outputs=so).clone(n=2).structured_outputs is so


# ---- logit bias ------------------------------------------------------------------------------
def test_logit_bias_adds_to_the_named_tokens_of_each_row_only() -> None:
    logits = np.arange(24, dtype=np.float32).reshape(3, 8)
    expected = logits.copy()
    expected[0, 2] += 5.0
    expected[0, 7] -= 100.0
    expected[2, 2] += 1.5
    apply_logit_bias(np, logits, [0, 2], [{2: 5.0, 7: -100.0}, {2: 1.5}])
    assert np.array_equal(logits, expected)


def test_logit_bias_of_100_makes_the_token_the_greedy_choice() -> None:
    logits = np.random.default_rng(0).standard_normal((2, 1000)).astype(np.float32) * 5
    apply_logit_bias(np, logits, [1], [{321: 100.0}])
    assert logits[1].argmax() == 321 and logits[0].argmax() != 321


# ---- allowed tokens --------------------------------------------------------------------------
def test_allowed_token_ids_allow_exactly_those_tokens_at_every_row() -> None:
    constraint = AllowedTokens([3, 64, 99], vocab_size=100)
    out = np.zeros((3, 4), dtype=np.int32)
    constraint.fill_bitmask([3, 64], out)
    for row in out:
        assert np.flatnonzero(allowed_tokens(row, 100)).tolist() == [3, 64, 99]
    assert constraint.accept(64) and not constraint.accept(65) and not constraint.is_finished


# ---- bad words -------------------------------------------------------------------------------
def vllm_banned(words: list[list[int]], past: list[int]) -> set[int]:
    """vLLM's rule, as its sampler states it: a word's last token is banned when the output so
    far ends with the rest of the word."""
    banned = set()
    for word in words:
        if len(word) > len(past) + 1:
            continue
        prefix = past[len(past) - (len(word) - 1) :] if len(word) > 1 else []
        if prefix == word[:-1]:
            banned.add(word[-1])
    return banned


def test_bad_words_forbid_the_completing_token_row_by_row() -> None:
    words = [[7], [1, 2, 3], [2, 5]]
    output = [9, 1]
    constraint = BadWords(words, output)
    proposed = [2, 5, 1, 2]
    out = np.zeros((len(proposed) + 1, 1), dtype=np.int32)
    constraint.fill_bitmask(proposed, out)
    for i in range(len(proposed) + 1):
        expected = set(range(32)) - vllm_banned(words, output + proposed[:i])
        assert set(np.flatnonzero(allowed_tokens(out[i], 32))) == expected, i
    # Accepting tokens moves the window: after [..., 1, 2] the word [1, 2, 3] is one token off.
    assert constraint.accept(2)
    assert not constraint.accept(3)


@pytest.mark.parametrize("model", ["smollm2", "qwen2.5"])
def test_bad_words_are_tokenized_as_written_and_after_a_space(model) -> None:
    tok = MODELS[model]().tokenizer
    words = tokenize_bad_words(["hello", " world peace"], tok)
    assert tok.encode("hello", add_special_tokens=False) in words
    assert tok.encode("world peace", add_special_tokens=False) in words
    spaced = tok.encode(" hello", add_special_tokens=False)
    assert (spaced in words) == (len(spaced) == len(tok.encode("hello", add_special_tokens=False)))
    for word in words:
        assert tok.decode(word).strip() in ("hello", "world peace")


def test_bad_word_that_tokenizes_to_nothing_is_refused() -> None:
    tok = MODELS["smollm2"]().tokenizer
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        tokenize_bad_words([""], tok)


# ---- combining with a grammar ----------------------------------------------------------------
def test_all_of_allows_the_intersection_and_advances_every_member() -> None:
    model = MODELS["smollm2"]()
    tok = model.tokenizer
    digits = [tok.encode(str(d), add_special_tokens=False)[0] for d in range(10)]
    grammar = compiler("smollm2").compile(StructuredOutputsParams(regex="[0-9]{3}")).constraint()
    allowed = AllowedTokens(digits[:5] + list(model.eos_token_ids), model.vocab_size)
    banned = BadWords([[digits[1], digits[2]]], [])
    constraint = combine([grammar, None, allowed, banned])
    assert isinstance(constraint, AllOf)
    out = allocate_bitmask(2, model.vocab_size)
    constraint.fill_bitmask([digits[1]], out)
    assert set(np.flatnonzero(allowed_tokens(out[0], model.vocab_size))) == set(digits[:5])
    assert set(np.flatnonzero(allowed_tokens(out[1], model.vocab_size))) == set(digits[:5]) - {
        digits[2]
    }
    logits = np.zeros((2, model.vocab_size), dtype=np.float32)
    apply_token_bitmask(logits, out)
    assert np.isfinite(logits[1]).sum() == 4
    assert constraint.accept(digits[1]) and not constraint.accept(digits[2])
    assert combine([None, allowed]) is allowed and combine([None]) is None
