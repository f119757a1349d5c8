"""hermes: tool calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes 2 Pro,
Qwen2.5, Qwen3), as vLLM's `--tool-call-parser hermes` reads them.

The content is the text before the first `<tool_call>`; text between and after the calls is
dropped. A last call whose closing tag never came still counts if its JSON is complete. Calls
end at the first malformed one; output whose first call is malformed is all content.
"""

from __future__ import annotations

from nanovllm.structured.tool_parsers.base import (
    CallStreamer,
    ParsedOutput,
    StreamDelta,
    complete_call,
    partial_suffix,
    scan_call,
    skip_space,
)

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesToolParser:
    name = "hermes"
    # The tags are special tokens in some models' vocabularies: keep them in the decoded text.
    keep_special_tokens = True

    def parse(self, text: str) -> ParsedOutput:
        if OPEN not in text:
            return ParsedOutput(text or None)
        calls = []
        for start in _call_starts(text):
            call = complete_call(text, start) if start < len(text) and text[start] == "{" else None
            if call is None:  # the calls before a malformed one stand, as streaming sent them
                break
            calls.append(call)
        if not calls:
            return ParsedOutput(text)
        return ParsedOutput(text[: text.index(OPEN)] or None, calls)

    def streamer(self) -> HermesStreamer:
        return HermesStreamer()


class HermesStreamer:
    def __init__(self) -> None:
        self.text = ""
        self.content_sent = 0
        self.calls = CallStreamer()

    def feed(self, delta: str) -> StreamDelta:
        self.text += delta
        text, out = self.text, StreamDelta()
        first = text.find(OPEN)
        # Hold back an end of the text that may be the start of <tool_call>.
        sendable = first if first >= 0 else len(text) - partial_suffix(text, OPEN)
        if sendable > self.content_sent:
            out.content = text[self.content_sent : sendable]
            self.content_sent = sendable
        for index, start in enumerate(_call_starts(text)):
            if start >= len(text) or text[start] != "{":
                break
            scan = scan_call(text, start)
            self.calls.update(index, text, scan, out.tool_calls)
            if scan.end is None or index >= len(self.calls.ids):
                break  # the next call's deltas wait until this one is complete
        return out

    def finish(self) -> StreamDelta:
        """At the end of the output: text held back as a possible tag start was content, and so
        is everything when no call came out of it (as `parse` says)."""
        if OPEN in self.text and self.calls.ids:
            return StreamDelta()
        out = StreamDelta(self.text[self.content_sent :])
        self.content_sent = len(self.text)
        return out


def _call_starts(text: str) -> list[int]:
    """Where each call's JSON begins: the first non-blank character after each <tool_call>."""
    starts, position = [], 0
    while (found := text.find(OPEN, position)) >= 0:
        start = skip_space(text, found + len(OPEN))
        starts.append(start)
        end = text.find(CLOSE, start)
        if end < 0:
            break
        position = end + len(CLOSE)
    return starts
