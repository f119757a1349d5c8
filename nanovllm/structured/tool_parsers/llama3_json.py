"""llama3_json: Llama 3.x's JSON tool calls, as vLLM's `--tool-call-parser llama3_json` reads them.

An output that starts (after blanks) with `<|python_tag|>` or `{` is tool calls: one or more
`{"name": ..., "parameters": {...}}` objects ("arguments" is accepted too) separated by `;`; it
then has no content, and text after the last call is dropped. Any other output is content. A
tool-call output whose first call does not parse is returned whole as content, with no calls.
"""

from __future__ import annotations

from nanovllm.structured.tool_parsers.base import (
    CallStreamer,
    ParsedOutput,
    StreamDelta,
    ToolCall,
    complete_call,
    scan_call,
    skip_space,
)

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser:
    name = "llama3_json"
    keep_special_tokens = False

    def parse(self, text: str) -> ParsedOutput:
        start = _calls_start(text)
        if start is None or start >= len(text) or text[start] != "{":
            return ParsedOutput(text or None)
        calls: list[ToolCall] = []
        position = start
        while True:
            call = complete_call(text, position) if text[position : position + 1] == "{" else None
            if call is None:  # the calls before a malformed one stand, as streaming sent them
                return ParsedOutput(None, calls) if calls else ParsedOutput(text)
            calls.append(call)
            position = skip_space(text, scan_call(text, position).end)
            if text[position : position + 1] != ";":
                return ParsedOutput(None, calls)  # text after the calls is dropped, as vLLM does
            position = skip_space(text, position + 1)

    def streamer(self) -> Llama3JsonStreamer:
        return Llama3JsonStreamer()


class Llama3JsonStreamer:
    def __init__(self) -> None:
        self.text = ""
        self.mode = "undecided"  # then "content" or "calls"
        self.calls = CallStreamer()

    def feed(self, delta: str) -> StreamDelta:
        self.text += delta
        if self.mode == "undecided":
            stripped = self.text.lstrip()
            if not stripped or PYTHON_TAG.startswith(stripped):
                return StreamDelta()  # blank, or maybe the start of <|python_tag|>
            calls = stripped.startswith(("{", PYTHON_TAG))
            self.mode = "calls" if calls else "content"
            if not calls:
                return StreamDelta(self.text)
        if self.mode == "content":
            return StreamDelta(delta)
        return self._calls()

    def finish(self) -> StreamDelta:
        """At the end of the output: text that never became a call was content, as `parse` says
        (a cut-short <|python_tag|>, or JSON that names no function)."""
        if self.mode == "undecided" and self.text.strip():
            return StreamDelta(self.text)
        if self.mode == "calls" and not self.calls.ids:
            return StreamDelta(self.text)
        return StreamDelta()

    def _calls(self) -> StreamDelta:
        text, out = self.text, StreamDelta()
        position = _calls_start(text)
        index = 0
        while position is not None and position < len(text) and text[position] == "{":
            scan = scan_call(text, position)
            self.calls.update(index, text, scan, out.tool_calls)
            if scan.end is None or index >= len(self.calls.ids):
                break
            position = skip_space(text, scan.end)
            if text[position : position + 1] != ";":
                break
            position, index = skip_space(text, position + 1), index + 1
        return out


def _calls_start(text: str) -> int | None:
    """Where the first call's JSON begins, or None for an output that is content."""
    start = skip_space(text, 0)
    if text.startswith(PYTHON_TAG, start):
        return skip_space(text, start + len(PYTHON_TAG))
    return start if text.startswith("{", start) else None
