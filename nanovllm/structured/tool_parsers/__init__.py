"""Tool-call parsers by name (vLLM's --tool-call-parser): each reads a complete output
(`parse(text) -> ParsedOutput`) and streams one (`streamer()`, then `feed(delta_text)` per step
and `finish()` at the end, each returning a StreamDelta of content and tool-call deltas)."""

from __future__ import annotations

from nanovllm.structured.tool_parsers.base import (
    ParsedOutput,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
    tool_call_id,
)
from nanovllm.structured.tool_parsers.hermes import HermesToolParser
from nanovllm.structured.tool_parsers.llama3_json import Llama3JsonToolParser

TOOL_PARSERS = {parser.name: parser for parser in (HermesToolParser, Llama3JsonToolParser)}


def tool_parser(name: str) -> HermesToolParser | Llama3JsonToolParser:
    """The parser `--tool-call-parser NAME` selects."""
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; available: {', '.join(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()


__all__ = [
    "TOOL_PARSERS",
    "ParsedOutput",
    "StreamDelta",
    "ToolCall",
    "ToolCallDelta",
    "tool_call_id",
    "tool_parser",
]
