"""What every tool parser shares: OpenAI-shaped tool calls and stream deltas, ids, and a tolerant
scanner of a tool call's JSON object that works on text still being generated.

Arguments are always the model's own JSON text of the arguments value, sliced from the output.
Streaming sends that text as it grows, so the argument fragments of a call add up exactly to the
arguments the complete-text parser returns.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

ARGUMENT_KEYS = ("arguments", "parameters")


def tool_call_id() -> str:
    """A fresh id, shaped as vLLM's."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text

    @classmethod
    def new(cls, name: str, arguments: str) -> ToolCall:
        return cls(tool_call_id(), name, arguments)

    def to_dict(self) -> dict[str, Any]:
        """The `tool_calls` entry of an OpenAI chat message."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(slots=True)
class ParsedOutput:
    """A complete output split into the message's content and its tool calls."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(slots=True)
class ToolCallDelta:
    """One piece of a streamed tool call: the first carries its id and name, later ones
    fragments of its arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The `delta.tool_calls` entry of an OpenAI chat chunk."""
        if self.name is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        function = {"name": self.name, "arguments": self.arguments}
        return {"index": self.index, "id": self.id, "type": "function", "function": function}


@dataclass(slots=True)
class StreamDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)


@dataclass(slots=True)
class CallScan:
    """What is known so far of a `{"name": ..., "arguments": ...}` object starting at `start`."""

    start: int
    name: str | None = None
    arguments_start: int | None = None
    arguments_end: int | None = None  # None while the arguments value is incomplete
    end: int | None = None  # just past the closing brace, once it came
    malformed: bool = False


def scan_call(text: str, start: int) -> CallScan:
    """Scan the JSON object at text[start] ("{"), which may be cut short: the name once its string
    is complete, where the arguments value (key "arguments" or "parameters") begins and ends."""
    scan = CallScan(start)
    i = start + 1
    while True:
        i = skip_space(text, i)
        if i >= len(text) or text[i] == "}":
            scan.end = i + 1 if i < len(text) else None
            return scan
        if text[i] == ",":
            i += 1
            continue
        key_end = value_end(text, i) if text[i] == '"' else None
        if key_end is None:
            scan.malformed = text[i] != '"'
            return scan
        key = json.loads(text[i:key_end])
        i = skip_space(text, key_end)
        if i >= len(text) or text[i] != ":":
            scan.malformed = i < len(text)
            return scan
        i = skip_space(text, i + 1)
        if i >= len(text):
            return scan
        end = value_end(text, i)
        if key == "name" and text[i] == '"' and end is not None:
            scan.name = json.loads(text[i:end])
        elif key in ARGUMENT_KEYS and scan.arguments_start is None:
            scan.arguments_start, scan.arguments_end = i, end
        if end is None:
            return scan
        i = end


def value_end(text: str, i: int) -> int | None:
    """Index just past the JSON value starting at text[i], or None if the text ends inside it."""
    opener = text[i]
    if opener == '"':
        escaped = False
        for j in range(i + 1, len(text)):
            if escaped:
                escaped = False
            elif text[j] == "\\":
                escaped = True
            elif text[j] == '"':
                return j + 1
        return None
    if opener in "{[":
        depth, in_string, escaped = 0, False, False
        for j in range(i, len(text)):
            c = text[j]
            if in_string:
                if escaped:
                    escaped = False
                elif c == "\\":
                    escaped = True
                elif c == '"':
                    in_string = False
            elif c == '"':
                in_string = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
        return None
    # A number, true, false or null: it ends where a delimiter or whitespace starts.
    for j in range(i, len(text)):
        if text[j] in ",}] \t\r\n":
            return j
    return None


def skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest proper prefix of `tag` that `text` ends with."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def complete_call(text: str, start: int) -> ToolCall | None:
    """The tool call whose JSON object is text[start:...], if it is complete and well formed."""
    scan = scan_call(text, start)
    if scan.name is None or scan.end is None or scan.malformed:
        return None
    try:
        json.loads(text[start : scan.end])
    except json.JSONDecodeError:
        return None
    return ToolCall.new(scan.name, _arguments(text, scan))


def _arguments(text: str, scan: CallScan) -> str:
    if scan.arguments_start is None:
        return "{}"
    return text[scan.arguments_start : scan.arguments_end]


class CallStreamer:
    """Streams the calls whose JSON objects a parser finds in the text, by index: each call's
    name once its string is complete, then its arguments text as it grows."""

    def __init__(self) -> None:
        self.ids: list[str] = []  # one per call whose name went out
        self.sent: list[int] = []  # argument characters sent, per call

    def update(self, index: int, text: str, scan: CallScan, out: list[ToolCallDelta]) -> None:
        if index == len(self.ids):
            if scan.name is None:
                return
            self.ids.append(tool_call_id())
            self.sent.append(0)
            out.append(ToolCallDelta(index, self.ids[index], scan.name))
        if scan.arguments_start is None:
            if scan.end is not None and self.sent[index] == 0:
                self.sent[index] = 2
                out.append(ToolCallDelta(index, arguments="{}"))
            return
        stop = scan.arguments_end if scan.arguments_end is not None else len(text)
        fragment = text[scan.arguments_start + self.sent[index] : stop]
        if fragment:
            self.sent[index] += len(fragment)
            out.append(ToolCallDelta(index, arguments=fragment))
