"""Chat choices read back into OpenAI messages (nanovllm/server/chat_outputs.py, through the
ResponseBuilder): reasoning split into `reasoning` and `reasoning_content`, tool calls with ids
and finish_reason "tool_calls", and streams whose chunks, fed to the official `openai`
client's own accumulator, add up to the non-streamed message. No model: the engine outputs are
built here, one character per step."""

from __future__ import annotations

import json

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from nanovllm.outputs import CompletionOutput, RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.server.chat_outputs import ChatParsing
from nanovllm.server.errors import APIError
from nanovllm.server.protocol import GenerateRequest
from nanovllm.server.responses import ResponseBuilder
from nanovllm.structured.tools import parse_tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def builder(parsing: ChatParsing) -> ResponseBuilder:
    request = GenerateRequest("chat", ["prompt"], SamplingParams(), False, True, False)
    return ResponseBuilder(request, tokenizer=None, model_name="m", parsing=parsing)


def final(text: str, reason: str = "stop") -> RequestOutput:
    choice = CompletionOutput(0, text, [1] * len(text), finish_reason=reason)
    return RequestOutput("r", None, [1, 2], [choice], finished=True)


def deltas(text: str, reason: str = "stop") -> list[RequestOutput]:
    """The DELTA outputs of a stream that adds one character per step."""
    outputs = []
    for i, char in enumerate(text):
        done = i == len(text) - 1
        choice = CompletionOutput(0, char, [1], finish_reason=reason if done else None,
                                  delta_text=char, delta_token_ids=[1])  # fmt: skip
        outputs.append(RequestOutput("r", None, [1, 2], [choice], finished=done))
    return outputs


def complete(parsing: ChatParsing, text: str, reason: str = "stop") -> dict:
    body = builder(parsing).response([final(text, reason)])
    ChatCompletion.model_validate(body)  # the official client's type takes it
    return body["choices"][0]


def streamed(parsing: ChatParsing, text: str, reason: str = "stop") -> tuple[dict, list[dict]]:
    """The message the official client's accumulator builds from the stream, and the deltas."""
    build = builder(parsing)
    chunks = build.first_chunks() + [
        c for o in deltas(text, reason) for c in build.delta_chunks(0, o)
    ]
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    choice = state.get_final_completion().choices[0]
    return {"message": choice.message.model_dump(), "finish_reason": choice.finish_reason}, [
        c["choices"][0]["delta"] for c in chunks if c["choices"]
    ]


def calls_of(message: dict) -> list[tuple[str, str]]:
    return [
        (c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []
    ]


HERMES = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_auto_tool_calls_come_with_ids_content_and_finish_reason_tool_calls():
    parsing = ChatParsing(tool_parser="hermes", tools=parse_tools([WEATHER]))
    choice = complete(parsing, HERMES)
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me look.\n"
    assert calls_of(choice["message"]) == [("get_weather", '{"city": "Paris"}')]
    assert choice["message"]["tool_calls"][0]["id"].startswith("chatcmpl-tool-")
    message, pieces = streamed(parsing, HERMES)
    assert message["finish_reason"] == "tool_calls"
    assert message["message"]["content"] == "Let me look.\n"
    assert calls_of(message["message"]) == calls_of(choice["message"])
    named = [
        d["tool_calls"][0] for d in pieces if d.get("tool_calls") and "id" in d["tool_calls"][0]
    ]
    assert [d["function"]["name"] for d in named] == ["get_weather"]  # the name once, first


def test_without_a_call_auto_is_plain_content():
    parsing = ChatParsing(tool_parser="hermes", tools=parse_tools([WEATHER]))
    choice = complete(parsing, "It is sunny.")
    assert choice["message"] == {"role": "assistant", "content": "It is sunny."}
    assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("choice", "text", "reason", "content"),
    [
        (
            "required",
            '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]',
            "tool_calls",
            None,
        ),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            '{"city": "Oslo"}',
            "stop",
            None,
        ),
    ],
)
def test_forced_calls_are_read_from_the_grammars_json(choice, text, reason, content):
    parsing = ChatParsing(tools=parse_tools([WEATHER], choice, auto_tools=False))
    complete_choice = complete(parsing, text)
    assert complete_choice["finish_reason"] == reason
    assert complete_choice["message"]["content"] is content
    assert calls_of(complete_choice["message"]) == [("get_weather", '{"city": "Oslo"}')]
    message, _ = streamed(parsing, text)
    assert calls_of(message["message"]) == [("get_weather", '{"city": "Oslo"}')]
    assert message["finish_reason"] == reason


def test_a_forced_call_cut_short_by_max_tokens_is_content():
    parsing = ChatParsing(tools=parse_tools([WEATHER], "required", auto_tools=False))
    choice = complete(parsing, '[{"name": "get_weather", "param', "length")
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"] == '[{"name": "get_weather", "param'


THINKING = "<think>\nIt is 2 + 2.\n</think>\n\nThe answer is 4."


@pytest.mark.parametrize("parser", ["qwen3", "deepseek_r1"])
def test_reasoning_goes_to_reasoning_and_reasoning_content(parser):
    choice = complete(ChatParsing(reasoning=parser), THINKING)
    message = choice["message"]
    assert message["reasoning"] == message["reasoning_content"] == "\nIt is 2 + 2.\n"
    assert message["content"] == "\n\nThe answer is 4."
    _, pieces = streamed(ChatParsing(reasoning=parser), THINKING)
    assert "".join(d.get("reasoning", "") for d in pieces) == message["reasoning"]
    assert "".join(d.get("reasoning_content", "") for d in pieces) == message["reasoning"]
    assert "".join(d.get("content") or "" for d in pieces) == message["content"]
    assert not any("think>" in json.dumps(d) for d in pieces)


def test_qwen3_with_thinking_off_is_all_content():
    parsing = ChatParsing(reasoning="qwen3", template_kwargs={"enable_thinking": False})
    message = complete(parsing, "The answer is 4.")["message"]
    assert message["content"] == "The answer is 4." and message["reasoning"] is None


def test_reasoning_then_a_tool_call():
    parsing = ChatParsing(reasoning="qwen3", tool_parser="hermes", tools=parse_tools([WEATHER]))
    text = "<think>Need weather.</think>" + HERMES
    choice = complete(parsing, text)
    assert choice["message"]["reasoning"] == "Need weather."
    assert calls_of(choice["message"]) == [("get_weather", '{"city": "Paris"}')]
    message, _ = streamed(parsing, text)
    assert calls_of(message["message"]) == calls_of(choice["message"])
    assert message["finish_reason"] == "tool_calls"


def test_a_choice_that_ended_with_an_error_fails_the_request():
    output = final("", "error")
    output.outputs[0].error = "token 5 is not allowed by the request's constraints"
    with pytest.raises(APIError) as caught:
        builder(ChatParsing()).response([output])
    assert caught.value.status == 400 and "not allowed" in caught.value.message
