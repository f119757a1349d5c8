"""Request validation without a server: defaults, precedence and the shape of a GenerateRequest."""

from __future__ import annotations

import json

import pytest

from nanovllm.sampling_params import SamplingParams
from nanovllm.server.errors import APIError
from nanovllm.server.protocol import (
    ProtocolContext,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_tokenize,
)

# What the server would build from a generation_config.json of temperature 0.7, top_p 0.8.
DEFAULTS = SamplingParams(temperature=0.7, top_p=0.8)


def render(messages: list[dict], add_generation_prompt: bool = True) -> str:
    text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
    return text + ("<assistant>" if add_generation_prompt else "")


CTX = ProtocolContext(DEFAULTS, "tiny", frozenset({"tiny", "/models/tiny"}), render, 320)
USER = [{"role": "user", "content": "hi"}]


def test_completion_keeps_server_defaults_and_openai_max_tokens_16():
    request = parse_completion({"prompt": "x"}, CTX)
    assert (request.params.temperature, request.params.top_p) == (0.7, 0.8)
    assert request.params.max_tokens == 16
    assert request.add_special_tokens and not request.stream and not request.echo


def test_request_fields_override_defaults():
    body = {"prompt": "x", "temperature": 0, "top_k": 5, "stop": "END", "seed": 3, "n": 2}
    params = parse_completion(body, CTX).params
    assert (params.temperature, params.top_k, params.stop, params.seed, params.n) == (0, 5, ["END"], 3, 2)  # fmt: skip
    assert params.top_p == 0.8


def test_chat_without_a_limit_may_fill_the_context():
    request = parse_chat({"messages": USER}, CTX)
    assert request.params.max_tokens is None  # the engine fills in the room left
    assert request.prompts == ["<user>hi<assistant>"]
    assert not request.add_special_tokens  # the template carries BOS if the model wants one


def test_max_completion_tokens_wins_over_max_tokens():
    body = {"messages": USER, "max_tokens": 9, "max_completion_tokens": 4}
    assert parse_chat(body, CTX).params.max_tokens == 4


def test_text_parts_are_joined_with_newlines():
    content = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    request = parse_chat({"messages": [{"role": "user", "content": content}]}, CTX)
    assert request.prompts == ["<user>a\nb<assistant>"]


def test_chat_logprobs_true_means_zero_alternatives_unless_top_logprobs():
    assert parse_chat({"messages": USER, "logprobs": True}, CTX).params.logprobs == 0
    body = {"messages": USER, "logprobs": True, "top_logprobs": 3}
    assert parse_chat(body, CTX).params.logprobs == 3
    assert parse_chat({"messages": USER}, CTX).params.logprobs is None


def test_prompt_forms():
    assert parse_completion({"prompt": ["a", "b"]}, CTX).prompts == ["a", "b"]
    assert parse_completion({"prompt": [1, 2]}, CTX).prompts == [[1, 2]]
    assert parse_completion({"prompt": [[1], [2, 3]]}, CTX).prompts == [[1], [2, 3]]


def test_include_usage_and_null_fields():
    body = {"prompt": "x", "stream": True, "stream_options": {"include_usage": True}, "seed": None}
    request = parse_completion(body, CTX)
    assert request.stream and request.include_usage and request.params.seed is None


def test_neutral_values_of_unsupported_fields_are_accepted():
    body = {"messages": USER, "tools": [], "tool_choice": "none", "response_format": {"type": "text"}}  # fmt: skip
    parse_chat(body, CTX)
    parse_completion({"prompt": "x", "best_of": 1, "suffix": "", "logit_bias": {}}, CTX)


def test_model_may_be_omitted_or_either_name():
    for model in ({}, {"model": "tiny"}, {"model": "/models/tiny"}):
        parse_completion({"prompt": "x", **model}, CTX)


def test_an_unknown_model_is_404_and_the_message_names_no_served_model():
    with pytest.raises(APIError) as info:
        parse_completion({"prompt": "x", "model": "gpt-9"}, CTX)
    assert (info.value.status, info.value.code, info.value.param) == (
        404,
        "model_not_found",
        "model",
    )
    assert "gpt-9" in info.value.message
    assert "tiny" not in info.value.message  # neither the served name nor the path


def test_length_errors_name_the_field_the_request_used():
    chat = parse_chat({"messages": USER, "max_completion_tokens": 5}, CTX)
    legacy = parse_chat({"messages": USER, "max_tokens": 5}, CTX)
    completion = parse_completion({"prompt": "x"}, CTX)
    assert (chat.prompt_field, chat.max_tokens_field) == ("messages", "max_completion_tokens")
    assert legacy.max_tokens_field == "max_tokens"
    assert (completion.prompt_field, completion.max_tokens_field) == ("prompt", "max_tokens")


def test_alias_is_named_in_errors():
    with pytest.raises(APIError) as info:
        parse_chat({"messages": USER, "max_completion_tokens": 0}, CTX)
    assert info.value.param == "max_completion_tokens"
    assert "max_completion_tokens" in info.value.message


def test_tokenize_defaults_follow_vllm():
    plain = parse_tokenize({"prompt": "x"}, CTX)
    chat = parse_tokenize({"messages": USER, "add_generation_prompt": False}, CTX)
    assert (plain.text, plain.add_special_tokens) == ("x", True)
    assert (chat.text, chat.add_special_tokens) == ("<user>hi", False)
    assert parse_detokenize({"tokens": [0, 319]}, CTX) == [0, 319]


@pytest.mark.parametrize("logprob", [float("-inf"), float("nan"), -1e9])
def test_logprobs_sent_as_json_are_finite(logprob):
    # JSON has no NaN or -Infinity: the API clamps to vLLM's floor instead.
    from nanovllm.server.responses import _clamp

    assert _clamp(logprob) == -9999.0
    assert json.loads(json.dumps({"logprob": _clamp(logprob)}, allow_nan=False)) == {
        "logprob": -9999.0
    }
