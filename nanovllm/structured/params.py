"""StructuredOutputsParams: the constraint one request puts on its output, named and shaped as vLLM's.

Exactly one of `json` (a JSON schema, as a dict or its JSON text), `regex`, `choice`,
`grammar` (Lark, or llama.cpp's GBNF), `json_object` (any JSON object) or `structural_tag`
(vLLM's JSON text: tagged JSON segments inside free text) is set; the other fields tune JSON
output. Only the shape is checked here; whether a schema, regex or grammar compiles is checked
by `nanovllm.structured.compiler`, which needs the model's tokenizer.
"""

from __future__ import annotations

import json as json_module
from dataclasses import dataclass
from typing import Any

from nanovllm.structured.errors import ParameterError

CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass(slots=True)
class StructuredOutputsParams:
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    # JSON output: no whitespace between tokens (vLLM's disable_any_whitespace), every object
    # closed to properties it does not name, or whitespace only of this regex.
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        if self.json_object is False:
            self.json_object = None  # "no JSON-object constraint", as if left out
        self.validate()

    def validate(self) -> None:
        given = [name for name in CONSTRAINTS if getattr(self, name) is not None]
        if len(given) != 1:
            found = f"got {', '.join(given)}" if given else "got none"
            raise ParameterError(
                "structured_outputs", f"exactly one of {', '.join(CONSTRAINTS)} is needed; {found}"
            )
        _check_json(self.json)
        for name in ("regex", "grammar", "structural_tag"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ParameterError(name, "must be a non-empty string")
        if self.choice is not None:
            _check_choice(self.choice)
        if self.json_object not in (None, True):
            raise ParameterError("json_object", f"must be a boolean, got {self.json_object!r}")
        for name in ("disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise ParameterError(name, "must be a boolean")
        if self.whitespace_pattern is not None and not isinstance(self.whitespace_pattern, str):
            raise ParameterError("whitespace_pattern", "must be a string")

    @property
    def kind(self) -> str:
        """Which constraint is set: one of CONSTRAINTS."""
        return next(name for name in CONSTRAINTS if getattr(self, name) is not None)

    def schema(self) -> dict[str, Any] | None:
        """The JSON schema of a `json` constraint as a dict (None for other kinds)."""
        if self.json is None:
            return None
        return self.json if isinstance(self.json, dict) else json_module.loads(self.json)


def _check_json(value: Any) -> None:
    if value is None or isinstance(value, dict):
        return
    if not isinstance(value, str):
        raise ParameterError(
            "json", f"must be a JSON schema object or its JSON text, got {value!r}"
        )
    try:
        parsed = json_module.loads(value)
    except json_module.JSONDecodeError as e:
        raise ParameterError("json", f"is not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise ParameterError("json", "must be a JSON schema object")


def _check_choice(choice: Any) -> None:
    if not isinstance(choice, list | tuple) or not choice:
        raise ParameterError("choice", "must be a non-empty list of strings")
    for i, option in enumerate(choice):
        if not isinstance(option, str) or not option:
            raise ParameterError(f"choice[{i}]", f"must be a non-empty string, got {option!r}")
