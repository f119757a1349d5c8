"""Engine and SamplingParams refuse values that would otherwise be silently changed or poison
the sampler."""

from __future__ import annotations

import math

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.errors import NanovllmError


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty", "min_p", "presence_penalty"])  # fmt: skip
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1e400])
def test_non_finite_numbers_are_refused(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        SamplingParams(**{field: value})


def test_max_model_len_beyond_the_kv_cache_is_refused_not_lowered(checkpoint_factory):
    with pytest.raises(
        NanovllmError, match="max_model_len 200 exceeds the KV cache capacity of 40"
    ):
        LLM(str(checkpoint_factory("llama3")), num_blocks=10, block_size=4, max_model_len=200)


def test_without_max_model_len_the_length_is_capped_to_the_kv_cache(checkpoint_factory):
    llm = LLM(str(checkpoint_factory("llama3")), num_blocks=10, block_size=4)
    assert llm.engine.max_model_len == 40
