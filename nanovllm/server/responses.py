"""OpenAI response shapes built from engine outputs: full responses, stream chunks, logprobs.

One `ResponseBuilder` per HTTP request. Choice `i` of prompt `p` is choice `p * n + i` of the
response, as in OpenAI and vLLM. The two endpoints differ only in how a choice, a delta and
its logprobs look; ids, usage and the bookkeeping of a stream are shared.
"""

from __future__ import annotations

import time
import uuid

from nanovllm.engine.logprobs import TokenLogprobs
from nanovllm.models.tokenizer import Tokenizer
from nanovllm.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from nanovllm.server.chat_outputs import ChatParsing, ChoiceStream
from nanovllm.server.errors import APIError
from nanovllm.server.protocol import GenerateRequest

# JSON has no -Infinity; vLLM clamps impossible tokens' logprobs to this.
_MIN_LOGPROB = -9999.0


class ResponseBuilder:
    def __init__(
        self,
        request: GenerateRequest,
        tokenizer: Tokenizer,
        model_name: str,
        parsing: ChatParsing | None = None,
    ) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.chat = request.endpoint == "chat"
        # Reasoning and tool-call parsing of chat choices (chat_outputs.py), when in play.
        self.parsing = parsing if self.chat and parsing is not None and parsing.active else None
        self.streams: dict[int, ChoiceStream] = {}  # choice -> its parsers' stream state
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.prompt_tokens: dict[int, int] = {}  # prompt index -> its length in tokens
        self.completion_tokens: dict[int, int] = {}  # choice -> tokens generated so far
        self.finished: set[int] = set()  # choices whose finish chunk was sent
        self.offsets: dict[int, int] = {}  # choice -> text_offset of its next token (legacy)
        # prompt index -> its prompt logprobs (a stream carries them in one output only)
        self.prompt_logprobs: dict[int, PromptLogprobs] = {}

    # ---- full responses --------------------------------------------------------------------
    def response(self, outputs: list[RequestOutput]) -> dict:
        """The whole response, from each prompt's final (cumulative) output."""
        for prompt_index, output in enumerate(outputs):
            self._count(prompt_index, output)
        choices = [
            self._choice(prompt_index, output, choice)
            for prompt_index, output in enumerate(outputs)
            for choice in output.outputs
        ]
        choices.sort(key=lambda c: c["index"])
        body = {**self._header(""), "choices": choices, "usage": self.usage()}
        if self.chat and self.request.params.prompt_logprobs is not None:
            body["prompt_logprobs"] = _prompt_logprobs_json(outputs[0].prompt_logprobs)
        return body

    def _choice(self, prompt_index: int, output: RequestOutput, choice: CompletionOutput) -> dict:
        index = self._index(prompt_index, choice)
        _check_error(choice)
        if self.chat:
            message = {"role": "assistant", "content": choice.text}
            reason = choice.finish_reason
            if self.parsing is not None:
                message, reason = self.parsing.message(choice.text, reason)
            return {
                "index": index,
                "message": message,
                "logprobs": self._chat_logprobs(choice.logprobs),
                "finish_reason": reason,
                "stop_reason": choice.stop_reason,
            }
        prefix = self._echo(output)
        entries, start = self._with_prompt(prompt_index, output, choice.logprobs, prefix)
        body = {
            "index": index,
            "text": prefix + choice.text,
            "logprobs": self._legacy_logprobs(index, entries, start=start),
            "finish_reason": choice.finish_reason,
            "stop_reason": choice.stop_reason,
        }
        if self.request.params.prompt_logprobs is not None:  # vLLM's extension
            body["prompt_logprobs"] = _prompt_logprobs_json(output.prompt_logprobs)
        return body

    def usage(self) -> dict:
        prompt = sum(self.prompt_tokens.values())
        completion = sum(self.completion_tokens.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    # ---- stream chunks ---------------------------------------------------------------------
    def first_chunks(self) -> list[dict]:
        """Chat streams open with the assistant role of every choice, as OpenAI's do."""
        if not self.chat:
            return []
        delta = {"role": "assistant", "content": ""}
        return [
            self._chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}])
            for i in range(self.request.num_choices)
        ]

    def delta_chunks(self, prompt_index: int, output: RequestOutput) -> list[dict]:
        """One chunk per choice of `output` (a DELTA output: only what is new) with new text,
        new logprobs or a new finish."""
        self._count(prompt_index, output, delta=True)
        chunks = []
        for choice in output.outputs:
            index = self._index(prompt_index, choice)
            if index in self.finished:
                continue
            _check_error(choice)
            delta = self._delta_choice(prompt_index, index, output, choice)
            if choice.finished:
                self.finished.add(index)
            elif delta is None:
                continue  # nothing to show yet (held back for UTF-8, a stop string, a parser)
            chunks.append(self._chunk([delta]))
        return chunks

    def usage_chunk(self) -> dict:
        return {**self._chunk([]), "usage": self.usage()}

    def _delta_choice(
        self, prompt_index: int, index: int, output: RequestOutput, choice: CompletionOutput
    ) -> dict | None:
        """The choice's part of a chunk; None while it has nothing to show."""
        reason = choice.finish_reason
        quiet = not choice.finished and not choice.delta_logprobs
        if self.chat:
            delta: dict = {"content": choice.delta_text}
            if self.parsing is not None:
                delta, reason = self._parsed_delta(index, choice)
            if quiet and not any(delta.values()):
                return None
            return {
                "index": index,
                "delta": delta,
                "logprobs": self._chat_logprobs(choice.delta_logprobs),
                "finish_reason": reason,
                "stop_reason": choice.stop_reason,
            }
        if quiet and not choice.delta_text:
            return None
        first = index not in self.offsets
        prefix = self._echo(output) if first else ""
        entries, start = choice.delta_logprobs, len(prefix)
        if first:
            entries, start = self._with_prompt(prompt_index, output, entries, prefix)
        return {
            "index": index,
            "text": prefix + choice.delta_text,
            "logprobs": self._legacy_logprobs(index, entries, start=start),
            "finish_reason": reason,
            "stop_reason": choice.stop_reason,
        }

    def _parsed_delta(self, index: int, choice: CompletionOutput) -> tuple[dict, str | None]:
        stream = self.streams.get(index)
        if stream is None:
            stream = self.streams[index] = self.parsing.streamer()
        delta = stream.feed(choice.delta_text)
        if choice.finished:
            for key, value in stream.finish().items():
                delta[key] = delta[key] + value if key in delta else value
        return delta, stream.finish_reason(choice.finish_reason)

    def _count(self, prompt_index: int, output: RequestOutput, delta: bool = False) -> None:
        self.prompt_tokens[prompt_index] = len(output.prompt_token_ids)
        for choice in output.outputs:
            index = self._index(prompt_index, choice)
            count = len(choice.delta_token_ids if delta else choice.token_ids)
            self.completion_tokens[index] = self.completion_tokens.get(index, 0) * delta + count

    def _chunk(self, choices: list[dict]) -> dict:
        return {**self._header(".chunk"), "choices": choices}

    def _header(self, suffix: str) -> dict:
        kind = "chat.completion" + suffix if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name}

    def _index(self, prompt_index: int, choice: CompletionOutput) -> int:
        return prompt_index * self.request.params.n + choice.index

    def _echo(self, output: RequestOutput) -> str:
        if not self.request.echo:
            return ""
        if output.prompt is not None:
            return output.prompt
        return self.tokenizer.decode(output.prompt_token_ids)

    # ---- logprobs --------------------------------------------------------------------------
    def _with_prompt(
        self, prompt_index: int, output: RequestOutput, entries: list | None, prefix: str
    ) -> tuple[list | None, int]:
        """With echo and logprobs, the prompt's tokens lead the choice's logprobs (vLLM): its
        first token as a bare id (nothing scores it), then its scored tokens. Also returns where
        text_offset starts: after an echoed prefix that has no logprobs, else at 0."""
        if output.prompt_logprobs is not None:
            self.prompt_logprobs[prompt_index] = output.prompt_logprobs
        if not (self.request.echo and entries is not None):
            return entries, len(prefix)
        ids, scored = output.prompt_token_ids, self.prompt_logprobs.get(prompt_index, [])
        k = self.request.params.prompt_logprobs
        prompt = [ids[0]] + [
            _token_logprobs(t, d, k) for t, d in zip(ids[1:], scored[1:], strict=True)
        ]
        return prompt + list(entries), 0

    def _legacy_logprobs(
        self, index: int, entries: list[TokenLogprobs | int] | None, start: int
    ) -> dict | None:
        """The completions API's shape; text_offset counts on across the chunks of a stream. A
        bare token id is a token without a logprob (an echoed prompt's first): nulls."""
        offset = self.offsets.get(index, 0) + start
        if entries is None:
            self.offsets[index] = offset
            return None
        tokens, logprobs, tops, offsets = [], [], [], []
        for entry in entries:
            if isinstance(entry, int):
                text = self._token_text(entry)
                tokens.append(text)
                logprobs.append(None)
                tops.append(None)
                offsets.append(offset)
                offset += len(text)
                continue
            text = self._token_text(entry.token_id)
            top = {self._token_text(t): _clamp(lp) for t, lp in entry.top}
            top.setdefault(text, _clamp(entry.logprob))  # vLLM lists the sampled token too
            tokens.append(text)
            logprobs.append(_clamp(entry.logprob))
            tops.append(top)
            offsets.append(offset)
            offset += len(text)
        self.offsets[index] = offset
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops,
                "text_offset": offsets}  # fmt: skip

    def _chat_logprobs(self, entries: list[TokenLogprobs] | None) -> dict | None:
        if entries is None:
            return None
        content = [
            {**self._token_logprob(entry.token_id, entry.logprob),
             "top_logprobs": [self._token_logprob(t, lp) for t, lp in entry.top]}
            for entry in entries
        ]  # fmt: skip
        return {"content": content, "refusal": None}

    def _token_logprob(self, token_id: int, logprob: float) -> dict:
        text = self._token_text(token_id)
        return {"token": text, "logprob": _clamp(logprob), "bytes": list(text.encode("utf-8"))}

    def _token_text(self, token_id: int) -> str:
        # Part of a multi-byte character decodes to U+FFFD, as in vLLM.
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def _check_error(choice: CompletionOutput) -> None:
    """A choice the engine ended with an error (its constraints left no token, its grammar did
    not compile) fails the request: 400, or a last error event in a stream."""
    if choice.finish_reason == "error":
        raise APIError(400, choice.error or "generation failed", code="generation_error")


def _token_logprobs(token_id: int, entry: dict[int, Logprob], k: int) -> TokenLogprobs:
    """A prompt token's vLLM dict back as the token's logprob and the k most likely."""
    top = sorted((lp.rank, t, lp.logprob) for t, lp in entry.items() if lp.rank <= k)
    chosen = entry[token_id]
    return TokenLogprobs(token_id, chosen.logprob, chosen.rank, [(t, v) for _, t, v in top])


def _prompt_logprobs_json(scored: PromptLogprobs | None) -> list | None:
    """vLLM's JSON of prompt_logprobs: null first, then {"<id>": {logprob, rank, decoded_token}}."""
    if scored is None:
        return None
    return [
        None if entry is None else {
            str(token_id): {"logprob": _clamp(lp.logprob), "rank": lp.rank,
                            "decoded_token": lp.decoded_token}
            for token_id, lp in entry.items()
        }
        for entry in scored
    ]  # fmt: skip


def _clamp(logprob: float) -> float:
    """A JSON-safe logprob: -inf (and NaN, from non-finite logits) become the floor."""
    value = float(logprob)
    return value if value > _MIN_LOGPROB else _MIN_LOGPROB
