"""The prompt-size bound (nanovllm/server/limits.py) never refuses a prompt that would fit.

It refuses a text of more than max_model_len x max_token_chars characters without tokenizing
it, so it must hold that no text tokenizes to fewer than len(text) / max_token_chars tokens.
Checked against the tokenizer itself on arbitrary text, with and without a normalizer.
"""

from __future__ import annotations

import copy
import functools

import pytest
from checkpoints import train_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import normalizers

from nanovllm.models.tokenizer import Tokenizer
from nanovllm.server.errors import APIError
from nanovllm.server.limits import PromptLimit

# Words of the tokenizer's corpus (long merges), combining marks, Hangul jamo (NFC joins three
# into one syllable), emoji and whitespace runs.
TEXT = st.lists(
    st.sampled_from(
        ["better than ", "scheduler", " ", "\n", "e", "\u0301", "\u0323", "\u1100", "\u1161",
         "\u11a8", "🙂", "東京", "<|im_start|>", "<|endoftext|>", "x"]
    ),
    max_size=100,
).map("".join)  # fmt: skip


@functools.cache
def plain() -> Tokenizer:
    return Tokenizer(train_tokenizer())


@functools.cache
def normalized() -> Tokenizer:
    backend = copy.deepcopy(train_tokenizer())
    backend.normalizer = normalizers.NFC()
    return Tokenizer(backend)


@pytest.mark.parametrize("make", [plain, normalized], ids=["plain", "nfc"])
@settings(max_examples=200, deadline=None)
@given(text=TEXT)
def test_no_text_has_fewer_tokens_than_the_bound_assumes(make, text):
    tokenizer = make()
    limit = PromptLimit.of(tokenizer, max_model_len=1)
    tokens = len(tokenizer.encode(text, add_special_tokens=False))
    assert tokens * limit.max_token_chars >= len(text)


def test_the_bound_refuses_by_characters_and_names_the_field():
    limit = PromptLimit.of(plain(), max_model_len=10)
    limit.check("x" * limit.max_chars, "prompt")  # at the bound: left to the tokenizer
    with pytest.raises(APIError) as info:
        limit.check("x" * (limit.max_chars + 1), "messages")
    assert (info.value.status, info.value.param) == (400, "messages")
