"""Incremental detokenization: token ids in, text out, one step at a time, plus stop strings.

Decoding each new id on its own is wrong in two ways: a byte-level BPE token may carry half of
a multi-byte character (decoding it alone gives U+FFFD), and SentencePiece-style decoders drop
or keep a leading space depending on what comes before. So, as vLLM does, we decode a small
window of ids twice — with and without the new ones — and emit the difference:

    window = [ ids already emitted | ids not yet emitted ]
              ^ prefix               ^ read

The new text is decode(window)[len(decode(window[:read])):], emitted only once it no longer
ends in U+FFFD (a character still waiting for its other bytes). After emitting, the window
slides so it starts at the old read position, which keeps every step O(window), not
O(length). The first window is the last few prompt ids, so the first output token decodes as
it would after the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from nanovllm.models.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_IDS = 5  # as in vLLM: decoders only treat the start of a window specially


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        if isinstance(stop, str):  # a lone string is one stop string, not its characters
            stop = [stop]
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop)
        self.stop_strings = StopStrings(self.stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.matched_stop: str | None = None
        # A stop string may begin in text already seen: keep that much back from streaming.
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.window = self._prompt_context(prompt_token_ids)
        self.read = len(self.window)
        self.buffer = _TextBuffer()
        self.sent = 0

    @property
    def text(self) -> str:
        return self.buffer.value()

    def add_tokens(self, token_ids: Sequence[int], check_stop: bool = True) -> str | None:
        """Feed newly generated ids; returns the stop string once one has matched.
        check_stop=False (below min_tokens) lets text pass that may not end the output."""
        for token_id in token_ids:
            if self.matched_stop is not None:
                break
            self.window.append(token_id)
            self._emit(self._decode_new(flush=False), check_stop)
        return self.matched_stop

    def finish(self) -> str | None:
        """Emit what is still held back (an unfinished character becomes U+FFFD, as in decode)."""
        if self.matched_stop is None:
            self._emit(self._decode_new(flush=True))
        return self.matched_stop

    def take_delta(self, finished: bool) -> str:
        """Text not returned before; while running, the tail a stop string may still claim stays."""
        if finished:
            self.finish()
        end = self.buffer.length
        # A stop kept in the output only cuts text after itself, never text already sent (vLLM).
        if not finished and self.matched_stop is None and not self.include_stop_str_in_output:
            end = max(end - self.holdback, self.sent)
        delta = self.buffer.since(self.sent)[: end - self.sent]
        self.sent = end
        return delta

    def _prompt_context(self, prompt_token_ids: Sequence[int]) -> list[int]:
        context = list(prompt_token_ids[-PROMPT_CONTEXT_IDS:])
        # A context cut inside a character garbles the output's start: a trailing partial
        # character swallows its first bytes, and a byte-fallback run that is invalid as a
        # whole decodes to U+FFFD throughout. So drop ids until the context decodes cleanly.
        while context and REPLACEMENT_CHAR in self._decode(context):
            context.pop(0)
        return context

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_new(self, flush: bool) -> str:
        prefix = self._decode(self.window[: self.read])
        full = self._decode(self.window)
        if len(full) <= len(prefix) or (full.endswith(REPLACEMENT_CHAR) and not flush):
            return ""
        self.window = self.window[self.read :]
        self.read = len(self.window)
        return full[len(prefix) :]

    def _emit(self, new_text: str, check_stop: bool = True) -> None:
        if not new_text:
            return
        if not self.stop or not check_stop:
            self.buffer.append(new_text)
            return
        start = max(self.buffer.length - self.holdback, 0)
        searched = self.buffer.since(start) + new_text
        self.buffer.append(new_text)
        match = self.stop_strings.first(searched, len(searched) - len(new_text))
        if match is not None:
            index, self.matched_stop = match
            if self.include_stop_str_in_output:
                index += len(self.matched_stop)
            self.buffer.truncate(start + index)


class StopStrings:
    """Finds the stop string that a piece of new text completes, looking only at the characters
    that could end one: the strings are grouped by their last character, so a new character
    costs as many comparisons as there are stop strings ending in it, however long the text."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.by_last: dict[str, list[str]] = {}
        for s in sorted(set(stop), key=len, reverse=True):  # longest first: it wins a tie
            self.by_last.setdefault(s[-1], []).append(s)

    def first(self, text: str, new_from: int) -> tuple[int, str] | None:
        """The stop string that ends first in text[new_from:] and its index in text.

        Ending first is what a reader going character by character would hit, so the result does
        not depend on how the text was split into tokens."""
        for end in range(new_from + 1, len(text) + 1):
            for s in self.by_last.get(text[end - 1], ()):
                if text.startswith(s, end - len(s)) and end >= len(s):
                    return end - len(s), s
        return None


class _TextBuffer:
    """Text kept in chunks, so appending, reading and cutting near the end never copy it all."""

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.length = 0

    def append(self, text: str) -> None:
        self.chunks.append(text)
        self.length += len(text)

    def since(self, start: int) -> str:
        """text[start:], touching only the chunks after start."""
        pieces = []
        end = self.length
        for chunk in reversed(self.chunks):
            if end <= start:
                break
            end -= len(chunk)
            pieces.append(chunk[max(start - end, 0) :])
        return "".join(reversed(pieces))

    def truncate(self, length: int) -> None:
        while self.length > length:
            chunk = self.chunks.pop()
            self.length -= len(chunk)
            if self.length < length:
                self.append(chunk[: length - self.length])

    def value(self) -> str:
        if len(self.chunks) > 1:
            self.chunks = ["".join(self.chunks)]
        return self.chunks[0] if self.chunks else ""
