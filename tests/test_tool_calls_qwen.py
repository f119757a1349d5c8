"""Tool calling end to end with the real Qwen2.5-Coder-0.5B (the demo GGUF) behind `nanovllm serve
--enable-auto-tool-choice --tool-call-parser hermes`, through the official `openai` client: a
required `get_weather(city)` call whose arguments validate (`jsonschema`), the same call
streamed (name first, then argument fragments, reassembled by the client's own accumulator),
and a second turn carrying the call and the tool's result, rendered by the model's template.

The model loads once for the module (~25 s on an idle machine) and three short requests run.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from _server_fixtures import start_server
from openai.lib.streaming.chat import ChatCompletionStreamState

from nanovllm.demo import demo_model_path

MODEL = "qwen-coder"
TIMEOUT_S = 600
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
QUESTION = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
REQUIRED = dict(model=MODEL, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=40)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(
        demo_model_path("qwen2.5-coder-demo"),
        tmp_path_factory.mktemp("qwen_server"),
        "--served-model-name", MODEL, "--max-model-len", "2048",
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
        start_timeout=300,
    )  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client(timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def required_call(client):
    return client.chat.completions.create(messages=QUESTION, **REQUIRED)


def test_a_required_call_names_the_tool_and_its_arguments_validate(required_call):
    choice = required_call.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.id.startswith("chatcmpl-tool-") and call.type == "function"
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    assert arguments["city"] == "Paris"


def test_streamed_deltas_reassemble_to_the_same_call(client, required_call):
    state, first = ChatCompletionStreamState(), []
    for chunk in client.chat.completions.create(messages=QUESTION, stream=True, **REQUIRED):
        state.handle_chunk(chunk)
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            first.append(delta.function.name is not None)
    streamed = state.get_final_completion().choices[0]
    expected = required_call.choices[0].message.tool_calls[0].function
    assert streamed.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == [
        (expected.name, expected.arguments)
    ]
    assert first[0] and not any(first[1:])  # the name once, in the first delta
    assert len(first) > 2  # the arguments came in several fragments


def test_the_tool_result_is_rendered_and_answered(client, server, required_call):
    call = required_call.choices[0].message.tool_calls[0]
    conversation = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees Celsius."},
    ]
    rendered = server.post("/tokenize", {"messages": conversation, "return_token_strs": False})
    assert rendered.status_code == 200, rendered.text
    text = server.post("/detokenize", {"tokens": rendered.json()["tokens"]}).json()["prompt"]
    # Qwen's template: the call as JSON inside <tool_call>, the result inside <tool_response>.
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<tool_response>\nSunny, 24 degrees Celsius.\n</tool_response>" in text
    # The answering turn leaves the tools out: with them in its system prompt this 0.5B model
    # only calls the tool again (greedy); without them it answers from the tool's result.
    reply = client.chat.completions.create(
        model=MODEL, messages=conversation, temperature=0, max_tokens=30
    )
    choice = reply.choices[0]
    assert not choice.message.tool_calls
    assert "Sunny, 24 degrees" in choice.message.content
