"""A request's structured-output fields -> the one constraint on its output, or a ParameterError
naming the field. Pure functions, for both HTTP endpoints and the offline API.

- OpenAI's `response_format`: {"type": "text"} (no constraint), {"type": "json_object"},
  {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}} (no schema:
  any JSON object; `strict` is accepted, and the schema is always enforced), and vLLM's
  {"type": "structural_tag", "structures": [...], "triggers": [...]}.
- vLLM's `structured_outputs` object: the fields of StructuredOutputsParams.
- A forced tool call (`tool_choice` "required" or a named function) brings its own grammar and
  cannot be combined with either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from nanovllm.structured.errors import ParameterError
from nanovllm.structured.params import StructuredOutputsParams
from nanovllm.structured.tools import ToolRequest, forced_call_params

RESPONSE_FORMATS = ("text", "json_object", "json_schema", "structural_tag")
_FIELDS = tuple(f.name for f in fields(StructuredOutputsParams))


@dataclass(slots=True)
class OutputConstraint:
    """The constraint of a request and the request field it came from (`field` names the field
    in errors found later, when the grammar is compiled for the model)."""

    params: StructuredOutputsParams
    field: str


def parse_response_format(value: Any) -> StructuredOutputsParams | None:
    """OpenAI's response_format (None, or {"type": "text"}, ask for nothing)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ParameterError("response_format", 'must be an object such as {"type": "json_object"}')
    kind = value.get("type")
    if kind not in RESPONSE_FORMATS:
        raise ParameterError(
            "response_format.type", f"must be one of {', '.join(RESPONSE_FORMATS)}, got {kind!r}"
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "structural_tag":
        spec = {k: value.get(k) for k in ("structures", "triggers")}
        return _wrapped(
            "response_format", lambda: StructuredOutputsParams(structural_tag=json.dumps(spec))
        )
    return _json_schema(value.get("json_schema"))


def _json_schema(spec: Any) -> StructuredOutputsParams:
    where = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise ParameterError(where, 'must be an object {"name": ..., "schema": {...}}')
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ParameterError(f"{where}.name", "must be a non-empty string")
    for key in ("strict",):
        if spec.get(key) is not None and not isinstance(spec[key], bool):
            raise ParameterError(f"{where}.{key}", "must be a boolean")
    if spec.get("description") is not None and not isinstance(spec["description"], str):
        raise ParameterError(f"{where}.description", "must be a string")
    schema = spec.get("schema")
    if schema is None:
        return StructuredOutputsParams(json_object=True)
    if not isinstance(schema, dict):
        raise ParameterError(f"{where}.schema", "must be a JSON schema object")
    return StructuredOutputsParams(json=schema)


def parse_structured_outputs(value: Any) -> StructuredOutputsParams | None:
    """vLLM's structured_outputs object, e.g. {"regex": "[0-9]+"} or {"choice": ["a", "b"]}."""
    if value is None:
        return None
    if isinstance(value, StructuredOutputsParams):
        return value
    if not isinstance(value, dict):
        raise ParameterError("structured_outputs", 'must be an object such as {"regex": "..."}')
    unknown = sorted(set(value) - set(_FIELDS))
    if unknown:
        raise ParameterError(
            f"structured_outputs.{unknown[0]}",
            f"is not a structured_outputs field; the fields are {', '.join(_FIELDS)}",
        )
    return _wrapped("structured_outputs", lambda: StructuredOutputsParams(**value))


def _wrapped(prefix: str, build) -> StructuredOutputsParams:
    """Build, naming a field error after the request field it sits in."""
    try:
        return build()
    except ParameterError as e:
        param = prefix if e.param == prefix else f"{prefix}.{e.param}"
        raise ParameterError(param, str(e).split(": ", 1)[1]) from None


def output_constraint(
    response_format: Any = None,
    structured_outputs: Any = None,
    tools: ToolRequest | None = None,
) -> OutputConstraint | None:
    """The one constraint a request puts on its output, from whichever field asks for it."""
    found = []
    if (params := parse_structured_outputs(structured_outputs)) is not None:
        found.append(OutputConstraint(params, "structured_outputs"))
    if (params := parse_response_format(response_format)) is not None:
        found.append(OutputConstraint(params, "response_format"))
    if tools is not None and tools.forced:
        found.append(OutputConstraint(forced_call_params(tools), "tools"))
    if len(found) > 1:
        names = " and ".join(
            c.field if c.field != "tools" else "a forced tool_choice" for c in found
        )
        raise ParameterError(
            found[1].field if found[1].field != "tools" else "tool_choice",
            f"{names} each constrain the output; a request may use only one of them",
        )
    return found[0] if found else None
