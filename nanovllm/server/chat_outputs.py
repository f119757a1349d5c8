"""What a chat choice's text becomes in a response: reasoning, content and tool calls.

The text goes through up to two parsers, as in vLLM: the reasoning parser (`--reasoning-parser`)
takes the `<think>` part out into `reasoning` (and `reasoning_content`, its older name); what is
left is content, which the tool-call parser of the request reads:

- tool_choice "auto" (`--enable-auto-tool-choice --tool-call-parser NAME`): the model's own
  format (hermes' `<tool_call>` tags, llama3_json's JSON), content beside the calls;
- "required" or a named function: the output is the grammar-forced JSON (nanovllm/structured/
  tools.py), all of it calls;
- "none", or no tools: content only.

`ChatParsing.message` reads a complete text into an OpenAI message; `ChatParsing.streamer`
gives a choice's stream its `ChoiceStream`, whose deltas add up to the same message. A call
makes the finish reason "tool_calls" (a named function's stays "stop", as in vLLM and OpenAI).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nanovllm.structured.reasoning import ReasoningDelta, reasoning_parser
from nanovllm.structured.tool_parsers import StreamDelta, ToolCall, tool_parser
from nanovllm.structured.tools import ForcedCallStreamer, ToolRequest, parse_forced_calls


@dataclass(slots=True)
class ChatParsing:
    """How one request's choices are read: None where a parser is not in play."""

    reasoning: str | None = None  # reasoning parser name
    tool_parser: str | None = None  # for tool_choice "auto"
    tools: ToolRequest | None = None
    template_kwargs: dict | None = None

    @property
    def active(self) -> bool:
        return self.reasoning is not None or self._tool_mode is not None

    @property
    def _tool_mode(self) -> str | None:
        tools = self.tools
        if tools is None or tools.choice == "none":
            return None
        if tools.forced:
            return "forced"
        return "auto" if self.tool_parser is not None else None

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The assistant message of a complete text, and the choice's finish reason."""
        reasoning, content = text, text
        if self.reasoning is not None:
            reasoning, content = reasoning_parser(self.reasoning, self.template_kwargs).split(text)
        calls, content = self._calls(content, finish_reason) if content else ([], content)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if self.reasoning is not None:
            message["reasoning"] = message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = [call.to_dict() for call in calls]
        return message, self._finish_reason(bool(calls), finish_reason)

    def streamer(self) -> ChoiceStream:
        return ChoiceStream(self)

    def _calls(self, content: str, finish_reason: str | None) -> tuple[list[ToolCall], str | None]:
        mode = self._tool_mode
        if mode == "auto":
            parsed = tool_parser(self.tool_parser).parse(content)
            return parsed.tool_calls, parsed.content
        if mode == "forced" and finish_reason != "length":
            try:
                return parse_forced_calls(self.tools, content), None
            except ValueError:  # cut short by a stop string, or an error: the text as it is
                pass
        return [], content

    def _finish_reason(self, called: bool, finish_reason: str | None) -> str | None:
        if called and finish_reason == "stop" and not self.tools.named:
            return "tool_calls"
        return finish_reason


class ChoiceStream:
    """One choice's stream: feed() each delta of text, finish() once; each returns the fields
    of an OpenAI delta (reasoning, reasoning_content, content, tool_calls) that have news."""

    def __init__(self, parsing: ChatParsing) -> None:
        self.parsing = parsing
        self.reasoning = None
        if parsing.reasoning is not None:
            self.reasoning = reasoning_parser(parsing.reasoning, parsing.template_kwargs).streamer()
        mode = parsing._tool_mode
        self.calls: Any = None
        if mode == "auto":
            self.calls = tool_parser(parsing.tool_parser).streamer()
        elif mode == "forced":
            self.calls = ForcedCallStreamer(parsing.tools)
        self.called = False

    def feed(self, text: str) -> dict[str, Any]:
        split = self.reasoning.feed(text) if self.reasoning else ReasoningDelta(content=text)
        return self._delta(split, self.calls.feed(split.content) if self.calls else None)

    def finish(self) -> dict[str, Any]:
        split = self.reasoning.finish() if self.reasoning else ReasoningDelta()
        calls = None
        if self.calls is not None:
            calls = self.calls.feed(split.content) if split.content else StreamDelta()
            tail = self.calls.finish()
            calls.content += tail.content
            calls.tool_calls += tail.tool_calls
        return self._delta(split, calls)

    def finish_reason(self, finish_reason: str | None) -> str | None:
        return self.parsing._finish_reason(self.called, finish_reason)

    def _delta(self, split: ReasoningDelta, calls: StreamDelta | None) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if split.reasoning:
            delta["reasoning"] = delta["reasoning_content"] = split.reasoning
        content = split.content if calls is None else calls.content
        if content:
            delta["content"] = content
        if calls is not None and calls.tool_calls:
            self.called = True
            delta["tool_calls"] = [call.to_dict() for call in calls.tool_calls]
        return delta
