"""Reasoning parsers: split a <think>...</think> model's output into reasoning and content.

As vLLM's `--reasoning-parser qwen3 | deepseek_r1`, complete and streaming. Both take the text
before `</think>` as reasoning (an opening `<think>` at the very start is dropped: newer
templates put it in the prompt) and the text after it as content. They differ when no
`</think>` came: then all of it is reasoning (the output was cut short while thinking). qwen3
also honours chat_template_kwargs {"enable_thinking": false}, with which its template closes the
think block in the prompt: then the whole output is content.

`ReasoningGate` wraps a TokenConstraint so that a grammar applies only once the reasoning ended.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from nanovllm.structured.bitmask import ALL_ALLOWED

if TYPE_CHECKING:
    from nanovllm.engine.constraints import TokenConstraint

START, END = "<think>", "</think>"


@dataclass(slots=True)
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    """One model family's convention; `thinking` False means the request turned thinking off."""

    name = ""
    honours_enable_thinking = False

    def __init__(self, thinking: bool = True) -> None:
        self.thinking = thinking

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a complete output; None where there is none."""
        if not self.thinking:
            return None, text or None
        body = _after_start(text)
        if body is None:  # the whole text is (a prefix of) <think>
            return None, None
        if END in body:
            reasoning, _, content = body.partition(END)
            return reasoning, content or None
        return body or None, None

    def streamer(self) -> ReasoningStreamer:
        return ReasoningStreamer(self)


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
    honours_enable_thinking = True


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    parser.name: parser for parser in (Qwen3ReasoningParser, DeepSeekR1ReasoningParser)
}


def reasoning_parser(name: str, chat_template_kwargs: dict | None = None) -> ReasoningParser:
    """The parser `--reasoning-parser NAME` selects, for one request."""
    if name not in REASONING_PARSERS:
        raise ValueError(
            f"unknown reasoning parser {name!r}; available: {', '.join(REASONING_PARSERS)}"
        )
    parser = REASONING_PARSERS[name]
    enabled = (chat_template_kwargs or {}).get("enable_thinking", True) is not False
    return parser(thinking=enabled or not parser.honours_enable_thinking)


class ReasoningStreamer:
    """Splits an output as it streams: feed() each new piece of text, finish() at the end. The
    pieces it returns add up to what `split` gives for the whole text. Text that may be the start
    of a tag is held back until the next piece tells."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser
        self.phase = "start" if parser.thinking else "content"
        self.held = ""

    def feed(self, text: str) -> ReasoningDelta:
        self.held += text
        delta = ReasoningDelta()
        if self.phase == "start":
            self._leave_start()
        if self.phase == "reasoning":
            end = self.held.find(END)
            if end >= 0:
                delta.reasoning = self.held[:end]
                self.held = self.held[end + len(END) :]
                self.phase = "content"
            else:
                keep = _partial_suffix(self.held, END)
                delta.reasoning = self.held[: len(self.held) - keep]
                self.held = self.held[len(self.held) - keep :]
        if self.phase == "content":
            delta.content, self.held = self.held, ""
        return delta

    def finish(self) -> ReasoningDelta:
        """Whatever is still held back, once the output is complete."""
        held, self.held = self.held, ""
        if self.phase == "start":
            body = _after_start(held)
            held = "" if body is None else held
        if not held:
            return ReasoningDelta()
        if self.phase == "content":
            return ReasoningDelta(content=held)
        return ReasoningDelta(reasoning=held)

    def _leave_start(self) -> None:
        body = _after_start(self.held)
        if body is None:
            return  # still blank, or a prefix of <think>: wait
        self.held = body
        self.phase = "reasoning"


def _after_start(text: str) -> str | None:
    """The text after a leading <think> (or all of it without one); None while the text is blank
    or a proper prefix of <think> (it cannot be told yet)."""
    stripped = text.lstrip()
    if stripped.startswith(START):
        return stripped[len(START) :]
    if not stripped or START.startswith(stripped):
        return None
    return text


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest proper prefix of `tag` that `text` ends with."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def reasoning_ended(
    prompt_token_ids: Sequence[int], start_ids: Sequence[int], end_ids: Sequence[int]
) -> bool:
    """Whether the prompt already closed the think block: its last `</think>` comes after its
    last `<think>` (Qwen3's template with thinking off ends the prompt with an empty block)."""
    last_end = _last_index(prompt_token_ids, end_ids)
    return last_end >= 0 and last_end > _last_index(prompt_token_ids, start_ids)


def _last_index(ids: Sequence[int], pattern: Sequence[int]) -> int:
    size = len(pattern)
    if not size:
        return -1
    for start in range(len(ids) - size, -1, -1):
        if list(ids[start : start + size]) == list(pattern):
            return start
    return -1


class ReasoningGate:
    """A constraint that allows every token until the reasoning ends (the output commits the
    token ids of `</think>`), then applies `inner` to the tokens after it."""

    def __init__(self, inner: TokenConstraint, end_ids: Sequence[int], ended: bool = False) -> None:
        if not end_ids:
            raise ValueError("the end-of-reasoning marker has no token ids")
        self.inner = inner
        self.end_ids = tuple(end_ids)
        self.ended = ended
        self.recent: list[int] = []  # the last committed tokens, up to len(end_ids) - 1

    def fill_bitmask(self, proposed: Sequence[int], out: np.ndarray) -> None:
        if self.ended:
            self.inner.fill_bitmask(proposed, out)
            return
        # Row i follows proposed[:i]: rows before the one right after the draft that completes
        # </think> allow everything; from that row on, the inner constraint's rows.
        ends_at = self._end_in(proposed)
        out[: len(proposed) + 1 if ends_at is None else ends_at] = ALL_ALLOWED
        if ends_at is not None:
            self.inner.fill_bitmask(proposed[ends_at:], out[ends_at : len(proposed) + 1])

    def accept(self, token_id: int) -> bool:
        if self.ended:
            return self.inner.accept(token_id)
        self.recent = (self.recent + [token_id])[-len(self.end_ids) :]
        if tuple(self.recent) == self.end_ids:
            self.ended = True
        elif len(self.end_ids) > 1:
            self.recent = self.recent[-(len(self.end_ids) - 1) :]
        return True

    @property
    def is_finished(self) -> bool:
        return self.ended and self.inner.is_finished

    def _end_in(self, proposed: Sequence[int]) -> int | None:
        """The index into `proposed` just past the draft that completes the marker, if any."""
        window = list(self.recent)
        for i, token in enumerate(proposed):
            window = (window + [token])[-len(self.end_ids) :]
            if tuple(window) == self.end_ids:
                return i + 1
        return None
