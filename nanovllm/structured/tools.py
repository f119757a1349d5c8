"""Tool definitions and tool_choice, as OpenAI's chat API and vLLM take them.

`parse_tools` checks a request's `tools`, `tool_choice` and `parallel_tool_calls` into a
ToolRequest. When the choice forces a call, `forced_call_params` gives the constraint that
enforces it, built from the tools' JSON schemas as vLLM builds it:

- `tool_choice="required"`: the output is a JSON array of one or more `{"name": ..., "parameters":
  {...}}` objects, each naming one of the tools with arguments valid for that tool (at most one
  call when parallel_tool_calls is false);
- a named function (`{"type": "function", "function": {"name": ...}}`): the output is that
  function's arguments object itself.

`parse_forced_calls` reads such an output back into tool calls and `ForcedCallStreamer` streams
them (the tool_parsers read the free-form `auto` outputs).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any

from nanovllm.structured.errors import ParameterError
from nanovllm.structured.params import StructuredOutputsParams
from nanovllm.structured.tool_parsers.base import (
    CallStreamer,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
    scan_call,
    skip_space,
    tool_call_id,
)

# OpenAI's rule for function names.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CHOICES = ("none", "auto", "required")
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(slots=True)
class Tool:
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI shape, for the chat template's `tools`."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        if self.parameters is not None:
            function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(slots=True)
class ToolRequest:
    """A request's tools and how it asks for them. `choice` is "none", "auto", "required" or
    the name of the function it must call."""

    tools: list[Tool] = field(default_factory=list)
    choice: str = "none"
    named: bool = False  # choice names one function
    parallel: bool = True

    @property
    def forced(self) -> bool:
        """The request must call a tool, so a grammar makes it."""
        return self.named or self.choice == "required"

    def tool(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)


def parse_tools(
    tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = None, auto_tools: bool = True
) -> ToolRequest:
    """Check the tool fields of a chat request. `auto_tools`: the server can parse free-form tool
    calls (vLLM's --enable-auto-tool-choice with a --tool-call-parser), which `auto` needs."""
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ParameterError("parallel_tool_calls", "must be a boolean")
    parsed = _tools(tools)
    if tool_choice is None:
        tool_choice = "auto" if parsed else "none"
    request = ToolRequest(parsed, parallel=parallel_tool_calls is not False)
    if isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise ParameterError(
                "tool_choice",
                f"must be one of {', '.join(CHOICES)} or a named function, got {tool_choice!r}",
            )
        request.choice = tool_choice
    else:
        request.choice, request.named = _named_choice(tool_choice), True
    if request.choice == "none":
        return request
    if not parsed:
        raise ParameterError("tool_choice", "needs `tools`: no tools were given to choose from")
    if request.named and request.tool(request.choice) is None:
        names = ", ".join(t.name for t in parsed)
        raise ParameterError(
            "tool_choice.function.name",
            f"the tool {request.choice!r} is not in `tools` (which has {names})",
        )
    if request.choice == "auto" and not auto_tools:
        raise ParameterError(
            "tool_choice",
            '"auto" needs the server started with --enable-auto-tool-choice and a '
            '--tool-call-parser; use "required" or a named function instead',
        )
    return request


def _tools(tools: Any) -> list[Tool]:
    if tools is None:
        return []
    if not isinstance(tools, list) or not tools:
        raise ParameterError("tools", "must be a non-empty array of tools (or left out)")
    parsed, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ParameterError(where, 'must be {"type": "function", "function": {...}}')
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ParameterError(f"{where}.function", "must be an object with a name")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ParameterError(
                f"{where}.function.name",
                f"must be 1-64 letters, digits, '_' or '-', got {name!r}",
            )
        if name in seen:
            raise ParameterError(f"{where}.function.name", f"{name!r} is defined twice")
        seen.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise ParameterError(f"{where}.function.description", "must be a string")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ParameterError(f"{where}.function.parameters", "must be a JSON schema object")
        parsed.append(Tool(name, description, parameters))
    return parsed


def _named_choice(choice: Any) -> str:
    usage = 'a named choice is {"type": "function", "function": {"name": "my_function"}}'
    if not isinstance(choice, dict) or choice.get("type") != "function":
        raise ParameterError("tool_choice", f"must be none, auto, required or named; {usage}")
    function = choice.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ParameterError("tool_choice.function.name", f"is missing; {usage}")
    return function["name"]


def forced_call_schema(request: ToolRequest) -> dict[str, Any]:
    """The JSON schema a forced call's output follows (see the module docstring)."""
    if request.named:
        return _parameters(request.tool(request.choice))
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "object", "anyOf": [_call_schema(t) for t in request.tools]},
    }
    if not request.parallel:
        schema["maxItems"] = 1
    definitions = _shared_definitions(request.tools)
    if definitions:
        schema["$defs"] = definitions
    return schema


def forced_call_params(request: ToolRequest) -> StructuredOutputsParams:
    return StructuredOutputsParams(json=forced_call_schema(request))


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.parameters if tool.parameters else EMPTY_PARAMETERS


def _call_schema(tool: Tool) -> dict[str, Any]:
    parameters = {k: v for k, v in _parameters(tool).items() if k != "$defs"}
    # vLLM's shape, closed to other keys so that a call object holds nothing but the call.
    return {
        "properties": {"name": {"type": "string", "enum": [tool.name]}, "parameters": parameters},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }


def _shared_definitions(tools: list[Tool]) -> dict[str, Any]:
    """Each tool's `$defs`, lifted to the root of the combined schema where `#/$defs/...`
    references resolve; two tools may share a name only for the same definition."""
    merged: dict[str, Any] = {}
    for tool in tools:
        for name, definition in (_parameters(tool).get("$defs") or {}).items():
            if name in merged and merged[name] != definition:
                raise ParameterError(
                    "tools", f"two tools define $defs/{name} differently; rename one of them"
                )
            merged[name] = copy.deepcopy(definition)
    return merged


def parse_forced_calls(request: ToolRequest, text: str) -> list[ToolCall]:
    """The tool calls in the output of a forced call. The arguments are the output's own JSON
    text of each call's parameters, as streaming sends them."""
    if request.named:
        json.loads(text)  # the grammar guarantees it; a cut-short output raises ValueError
        return [ToolCall.new(request.choice, text.strip())]
    calls = json.loads(text)
    if not isinstance(calls, list):
        raise ValueError("a required tool call output must be a JSON array")
    out = []
    for scan in _array_calls(text):
        if scan.name is None or scan.arguments_end is None:
            raise ValueError("a tool call object lacks its name or parameters")
        out.append(ToolCall.new(scan.name, text[scan.arguments_start : scan.arguments_end]))
    return out


def _array_calls(text: str) -> list:
    """Scans of the call objects of a `[{...}, {...}]` output so far, up to the first one that is
    not complete yet."""
    scans = []
    position = skip_space(text, 0)
    if text[position : position + 1] != "[":
        return scans
    position += 1
    while True:
        position = skip_space(text, position)
        if text[position : position + 1] == ",":
            position += 1
            continue
        if text[position : position + 1] != "{":
            return scans
        scan = scan_call(text, position)
        scans.append(scan)
        if scan.end is None:
            return scans
        position = scan.end


class ForcedCallStreamer:
    """Streams the tool calls of a forced call's output (see `parse_forced_calls`): the same
    calls, names first, argument fragments adding up to the same arguments."""

    def __init__(self, request: ToolRequest) -> None:
        self.request = request
        self.text = ""
        self.calls = CallStreamer()
        self.named_sent = 0  # named: characters of the arguments sent

    def feed(self, delta: str) -> StreamDelta:
        self.text += delta
        out = StreamDelta()
        if self.request.named:
            self._named(out)
        else:
            for index, scan in enumerate(_array_calls(self.text)):
                self.calls.update(index, self.text, scan, out.tool_calls)
                if index >= len(self.calls.ids):
                    break
        return out

    def finish(self) -> StreamDelta:
        return StreamDelta()

    def _named(self, out: StreamDelta) -> None:
        # The arguments are the whole output without surrounding blanks: hold trailing blanks
        # back until something follows them.
        start = skip_space(self.text, 0)
        stop = len(self.text.rstrip())
        if stop <= start:
            return
        if not self.calls.ids:
            self.calls.ids.append(tool_call_id())
            out.tool_calls.append(ToolCallDelta(0, self.calls.ids[0], self.request.choice))
        fragment = self.text[start + self.named_sent : stop]
        if fragment:
            self.named_sent += len(fragment)
            out.tool_calls.append(ToolCallDelta(0, arguments=fragment))
