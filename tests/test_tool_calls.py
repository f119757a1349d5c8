"""Tool calling pieces: tools/tool_choice validation, the grammars that force a call (their outputs
parse, and the arguments validate against each tool's schema: `jsonschema`), and the tool-call
parsers, whose streamed deltas, fed to the official `openai` client's own stream accumulator,
reassemble to exactly what the complete-text parser returns.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from _structured_fixtures import MODELS, Walk
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from nanovllm.structured.errors import ParameterError
from nanovllm.structured.tool_parsers import TOOL_PARSERS, tool_call_id, tool_parser
from nanovllm.structured.tools import (
    ForcedCallStreamer,
    forced_call_params,
    forced_call_schema,
    parse_forced_calls,
    parse_tools,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ROUTE = {
    "type": "function",
    "function": {
        "name": "plan_route",
        "parameters": {
            "$defs": {
                "Stop": {
                    "type": "object",
                    "properties": {"place": {"type": "string", "maxLength": 12}},
                    "required": ["place"],
                    "additionalProperties": False,
                }
            },
            "type": "object",
            "properties": {
                "stops": {"type": "array", "items": {"$ref": "#/$defs/Stop"}, "maxItems": 2},
                "days": {"type": "integer", "minimum": 1, "maximum": 9},
            },
            "required": ["stops", "days"],
            "additionalProperties": False,
        },
    },
}
NO_PARAMETERS = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, ROUTE, NO_PARAMETERS]


def tool_schema(name: str) -> dict:
    tool = next(t for t in TOOLS if t["function"]["name"] == name)
    return tool["function"].get("parameters") or {"type": "object"}


# ---- tools and tool_choice -------------------------------------------------------------------
def test_tool_choice_defaults_to_auto_with_tools_and_none_without() -> None:
    assert parse_tools(TOOLS).choice == "auto"
    assert parse_tools(None).choice == "none"
    named = parse_tools(TOOLS, {"type": "function", "function": {"name": "plan_route"}}, False)
    assert (named.choice, named.named, named.forced, named.parallel) == (
        "plan_route",
        True,
        True,
        False,
    )
    assert parse_tools(TOOLS, "none").tools[0].to_dict() == WEATHER


@pytest.mark.parametrize(
    ("args", "param", "message"),
    [
        (
            (TOOLS, {"type": "function", "function": {"name": "book_flight"}}),
            "tool_choice.function.name",
            "the tool 'book_flight' is not in `tools` (which has get_weather, plan_route",
        ),
        ((None, "required"), "tool_choice", "needs `tools`"),
        (([], "auto"), "tools", "non-empty array"),
        ((TOOLS, "sometimes"), "tool_choice", "must be one of none, auto, required"),
        ((TOOLS, {"type": "function"}), "tool_choice.function.name", "is missing"),
        ((TOOLS, {"name": "get_weather"}), "tool_choice", "named"),
        (([{"type": "retrieval"}],), "tools[0]", '"type": "function"'),
        (([{"type": "function", "function": {"name": "a b"}}],), "tools[0].function.name", "1-64"),
        (([WEATHER, WEATHER],), "tools[1].function.name", "defined twice"),
        (
            ([{"type": "function", "function": {"name": "f", "parameters": "{}"}}],),
            "tools[0].function.parameters",
            "JSON schema object",
        ),
        ((TOOLS, "auto", "yes"), "parallel_tool_calls", "boolean"),
    ],
)
def test_bad_tool_fields_name_the_parameter(args, param, message) -> None:
    with pytest.raises(ParameterError) as caught:
        parse_tools(*args)
    assert caught.value.param == param
    assert message in str(caught.value)


def test_auto_needs_a_tool_call_parser_on_the_server() -> None:
    with pytest.raises(ParameterError, match="--enable-auto-tool-choice"):
        parse_tools(TOOLS, auto_tools=False)
    assert parse_tools(TOOLS, "required", auto_tools=False).forced


def test_tools_with_conflicting_definitions_are_refused() -> None:
    other = json.loads(json.dumps(ROUTE))
    other["function"]["name"] = "other_route"
    other["function"]["parameters"]["$defs"]["Stop"]["properties"]["place"]["maxLength"] = 3
    with pytest.raises(ParameterError, match=r"\$defs/Stop differently"):
        forced_call_schema(parse_tools([ROUTE, other], "required"))


# ---- forced calls ----------------------------------------------------------------------------
def forced_walk(request, seed: int) -> str:
    walk = Walk("qwen2.5", forced_call_params(request), seed=seed)
    assert walk.run(max_steps=600), walk.text
    return walk.text


@pytest.mark.parametrize("seed", range(4))
def test_required_call_output_always_parses_and_validates(seed) -> None:
    request = parse_tools(TOOLS, "required")
    text = forced_walk(request, seed)
    calls = parse_forced_calls(request, text)
    assert calls and len(calls) == len(json.loads(text))
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), tool_schema(call.name))
    assert_stream_matches(ForcedCallStreamer(request), text, None, calls)


def test_required_call_without_parallel_calls_makes_exactly_one() -> None:
    request = parse_tools(TOOLS, "required", parallel_tool_calls=False)
    assert forced_call_schema(request)["maxItems"] == 1
    for seed in range(3):
        assert len(parse_forced_calls(request, forced_walk(request, seed))) == 1


@pytest.mark.parametrize("name", ["get_weather", "plan_route", "get_time"])
def test_named_call_output_is_that_functions_arguments(name) -> None:
    request = parse_tools(TOOLS, {"type": "function", "function": {"name": name}})
    text = forced_walk(request, seed=11)
    (call,) = parse_forced_calls(request, text)
    assert call.name == name
    jsonschema.validate(json.loads(call.arguments), tool_schema(name))
    assert_stream_matches(ForcedCallStreamer(request), text, None, [call])


def test_required_schema_is_vllms() -> None:
    schema = forced_call_schema(parse_tools([WEATHER, ROUTE], "required"))
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    first, second = schema["items"]["anyOf"]
    assert first["properties"]["name"] == {"type": "string", "enum": ["get_weather"]}
    assert first["required"] == ["name", "parameters"]
    assert "$defs" not in second["properties"]["parameters"]
    assert schema["$defs"] == ROUTE["function"]["parameters"]["$defs"]
    # The tools as given are not modified.
    assert "$defs" in ROUTE["function"]["parameters"]


# ---- tool-call parsers -----------------------------------------------------------------------
HERMES_TEXTS = [
    (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
        '"unit": "celsius"}}\n</tool_call>',
        "Let me check.\n",
        [("get_weather", '{"city": "Paris", "unit": "celsius"}')],
    ),
    (
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n<tool_call>\n'
        '{"arguments": {"stops": [{"place": "a{b}\\"c"}], "days": 2}, "name": "plan_route"}\n'
        "</tool_call>",
        None,
        [("get_time", "{}"), ("plan_route", '{"stops": [{"place": "a{b}\\"c"}], "days": 2}')],
    ),
    # No closing tag (generation stopped at it): the complete JSON still counts.
    ('<tool_call>{"name": "get_time"}', None, [("get_time", "{}")]),
    ("Just an answer, 2 < 3 and <tool not a call.", "Just an answer, 2 < 3 and <tool not a call.", []),
    ("ends with a tag start <tool_ca", "ends with a tag start <tool_ca", []),
    # Malformed call: the whole output is content.
    ('Hi <tool_call>{"name": get_time}</tool_call>', 'Hi <tool_call>{"name": get_time}</tool_call>', []),
]  # fmt: skip
LLAMA_TEXTS = [
    (
        '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}',
        None,
        [("get_weather", '{"city": "Oslo", "unit": "celsius"}')],
    ),
    (
        '<|python_tag|>{"name": "get_time", "parameters": {}}; {"name": "plan_route", '
        '"arguments": {"stops": [], "days": 3}}',
        None,
        [("get_time", "{}"), ("plan_route", '{"stops": [], "days": 3}')],
    ),
    ("  The weather is fine.", "  The weather is fine.", []),
    ('{"answer": 42}', '{"answer": 42}', []),
    ("<|python_ta", "<|python_ta", []),
    ('{"name": "f", "parameters": {}} trailing', None, [("f", "{}")]),
]


def openai_reassembly(deltas) -> tuple[str | None, list[tuple[str, str, str]]]:
    """Feed the deltas as chat chunks to the openai client's stream accumulator."""
    state = ChatCompletionStreamState()
    for i, delta in enumerate(deltas):
        body = {"content": delta.content or None}
        if i == 0:
            body["role"] = "assistant"
        if delta.tool_calls:
            body["tool_calls"] = [d.to_dict() for d in delta.tool_calls]
        last = i == len(deltas) - 1
        chunk = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "delta": body, "finish_reason": "stop" if last else None}],
        }
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    message = state.get_final_completion().choices[0].message
    calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []]
    return message.content, calls


def assert_stream_matches(streamer, text: str, content, calls, pieces=None) -> None:
    pieces = list(text) if pieces is None else pieces
    deltas = [streamer.feed(piece) for piece in pieces] + [streamer.finish()]
    got_content, got_calls = openai_reassembly(deltas)
    assert (got_content or None) == content
    assert [(name, args) for _, name, args in got_calls] == [(c.name, c.arguments) for c in calls]
    for call_id, _, _ in got_calls:
        assert re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", call_id)
    # Each call's first delta names it (with its id), and no later delta does.
    first = {}
    for delta in deltas:
        for piece in delta.tool_calls:
            if piece.index not in first:
                assert piece.name is not None and piece.id is not None
                first[piece.index] = piece
            else:
                assert piece.name is None and piece.arguments


@pytest.mark.parametrize(
    ("parser", "case"),
    [("hermes", i) for i in range(len(HERMES_TEXTS))]
    + [("llama3_json", i) for i in range(len(LLAMA_TEXTS))],
)
def test_complete_parse_and_stream_agree(parser, case) -> None:
    text, content, expected = (HERMES_TEXTS if parser == "hermes" else LLAMA_TEXTS)[case]
    parsed = tool_parser(parser).parse(text)
    assert parsed.content == content
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == expected
    for call in parsed.tool_calls:
        json.loads(call.arguments)
    for pieces in (list(text), [text], [text[:5], text[5:17], text[17:]]):
        assert_stream_matches(
            tool_parser(parser).streamer(), text, content, parsed.tool_calls, pieces
        )


@pytest.mark.parametrize(
    ("parser", "text"),
    [
        ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1}'),
        ("llama3_json", '{"name": "f", "parameters": {"a": [1, 2'),
    ],
)
def test_call_cut_short_is_content_in_the_complete_parse(parser, text) -> None:
    """As vLLM: a call whose JSON never closed (max_tokens) is not a call. Streaming cannot know
    in advance and has sent the name and the arguments so far; only a forced call (a grammar)
    rules this out."""
    assert tool_parser(parser).parse(text).content == text
    streamer = tool_parser(parser).streamer()
    deltas = [streamer.feed(c) for c in text] + [streamer.finish()]
    assert [d.name for delta in deltas for d in delta.tool_calls if d.name] == ["f"]


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
def test_stream_of_real_qwen_tokens(parser) -> None:
    tok = MODELS["qwen2.5"]().tokenizer
    text = (HERMES_TEXTS if parser == "hermes" else LLAMA_TEXTS)[1][0]
    ids = tok.encode(text, add_special_tokens=False)
    pieces, previous = [], ""
    for i in range(1, len(ids) + 1):
        current = tok.decode(ids[:i], skip_special_tokens=False)
        pieces.append(current[len(previous) :])
        previous = current
    parsed = tool_parser(parser).parse(text)
    assert_stream_matches(
        tool_parser(parser).streamer(), text, parsed.content, parsed.tool_calls, pieces
    )


def test_name_goes_out_before_any_argument_and_whole() -> None:
    streamer = tool_parser("hermes").streamer()
    assert not streamer.feed('<tool_call>{"name": "get_wea').tool_calls
    delta = streamer.feed('ther", "arguments": {"ci')
    assert [d.to_dict() for d in delta.tool_calls] == [
        {
            "index": 0,
            "id": delta.tool_calls[0].id,
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
        },
        {"index": 0, "function": {"arguments": '{"ci'}},
    ]


def test_registry_and_ids() -> None:
    assert set(TOOL_PARSERS) == {"hermes", "llama3_json"}
    assert tool_call_id() != tool_call_id()
    with pytest.raises(ValueError, match="unknown tool call parser 'mistral'; available: hermes"):
        tool_parser("mistral")
