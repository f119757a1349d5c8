"""The request surface: OpenAI's response_format, vLLM's structured_outputs object and forced tool
calls -> one constraint, or a ParameterError naming the request field."""

from __future__ import annotations

import pytest
from _structured_fixtures import compiler

from nanovllm.structured.errors import ParameterError
from nanovllm.structured.params import StructuredOutputsParams
from nanovllm.structured.request import (
    output_constraint,
    parse_response_format,
    parse_structured_outputs,
)
from nanovllm.structured.tools import parse_tools

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}


def test_response_format_kinds() -> None:
    assert parse_response_format(None) is None
    assert parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}) == StructuredOutputsParams(
        json_object=True
    )
    spec = {"name": "answer", "schema": SCHEMA, "strict": True, "description": "x"}
    assert parse_response_format({"type": "json_schema", "json_schema": spec}).json == SCHEMA
    # No schema: any JSON object.
    bare = parse_response_format({"type": "json_schema", "json_schema": {"name": "any"}})
    assert bare.kind == "json_object"


def test_pydantic_models_schema_from_the_openai_client_compiles() -> None:
    """What `client.chat.completions.parse(response_format=Model)` sends."""
    from openai.lib._parsing._completions import type_to_response_format_param
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int
        tags: list[str]

    class Answer(BaseModel):
        cities: list[City]
        best: City | None

    response_format = type_to_response_format_param(Answer)
    params = parse_response_format(response_format)
    assert params.json["additionalProperties"] is False
    compiler("smollm2").compile(params, field="response_format")


def test_structural_tag_response_format() -> None:
    tag = {
        "type": "structural_tag",
        "structures": [{"begin": "<function=f>", "schema": SCHEMA, "end": "</function>"}],
        "triggers": ["<function="],
    }
    params = parse_response_format(tag)
    assert params.kind == "structural_tag"
    compiler("smollm2").compile(params)


@pytest.mark.parametrize(
    ("value", "param", "message"),
    [
        ("json", "response_format", "must be an object"),
        ({"type": "xml"}, "response_format.type", "must be one of text, json_object"),
        ({"type": "json_schema"}, "response_format.json_schema", "must be an object"),
        ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "response_format.json_schema.name", "non-empty string"),
        ({"type": "json_schema", "json_schema": {"name": "a", "schema": "{}"}}, "response_format.json_schema.schema", "JSON schema object"),
        ({"type": "json_schema", "json_schema": {"name": "a", "strict": "yes"}}, "response_format.json_schema.strict", "boolean"),
        ({"type": "structural_tag", "structures": []}, "response_format.structural_tag", "no structures given"),
    ],
)  # fmt: skip
def test_bad_response_format_names_the_field(value, param, message) -> None:
    with pytest.raises(ParameterError) as caught:
        params = parse_response_format(value)
        compiler("smollm2").compile(params, field="response_format.structural_tag")
    assert caught.value.param == param
    assert message in str(caught.value)
    assert str(caught.value).startswith(param)


def test_structured_outputs_object() -> None:
    assert parse_structured_outputs({"regex": "[0-9]+"}).regex == "[0-9]+"
    params = parse_structured_outputs({"json": SCHEMA, "disable_any_whitespace": True})
    assert params.disable_any_whitespace and params.kind == "json"
    same = StructuredOutputsParams(choice=["a"])
    assert parse_structured_outputs(same) is same


@pytest.mark.parametrize(
    ("value", "param"),
    [
        ({"regex": "a", "choice": ["a"]}, "structured_outputs"),
        ({}, "structured_outputs"),
        ({"choice": "a"}, "structured_outputs.choice"),
        ({"json": "{oops"}, "structured_outputs.json"),
        ({"regexp": "a"}, "structured_outputs.regexp"),
        ([1], "structured_outputs"),
    ],
)
def test_bad_structured_outputs_names_the_field(value, param) -> None:
    with pytest.raises(ParameterError) as caught:
        parse_structured_outputs(value)
    assert caught.value.param == param


def test_one_constraint_per_request() -> None:
    constraint = output_constraint(response_format={"type": "json_object"})
    assert (constraint.field, constraint.params.kind) == ("response_format", "json_object")
    assert output_constraint(structured_outputs={"regex": "a"}).field == "structured_outputs"
    forced = output_constraint(tools=parse_tools([WEATHER], "required"))
    assert forced.field == "tools" and forced.params.json["type"] == "array"
    assert output_constraint(tools=parse_tools([WEATHER], "auto")) is None
    assert output_constraint(response_format={"type": "text"}) is None
    with pytest.raises(ParameterError) as both:
        output_constraint({"type": "json_object"}, {"regex": "a"})
    assert both.value.param == "response_format"
    with pytest.raises(ParameterError) as with_tools:
        output_constraint(
            {"type": "json_object"},
            tools=parse_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}}),
        )
    assert with_tools.value.param == "tool_choice"
    assert "a forced tool_choice" in str(with_tools.value)
