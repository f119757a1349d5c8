"""OutputProcessor: sampled tokens into text and RequestOutputs.

`process` appends each sequence's new tokens one at a time and applies the stop rules after
each (stop token ids, EOS, stop strings through the incremental detokenizer, a finished
constraint, max_tokens, the model's length), so a stop inside an accepted speculative run cuts
it there. It records what the step added to each sequence; `output` then builds a request's
RequestOutput from that record without changing anything, in the request's output kind:
CUMULATIVE (everything so far, plus the step's delta), DELTA (only what is new, as vLLM's
streaming does: a slow reader costs memory proportional to what it has not read, not to the
square of the stream's length) or FINAL_ONLY (one output, at the end).
"""

from __future__ import annotations

from dataclasses import dataclass

from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.logprobs import TokenLogprobs
from nanovllm.engine.sequence import Request, Sequence
from nanovllm.engine.stats import IterationStats
from nanovllm.engine.step import RunnerOutput, SampledSeq, SchedulerOutput
from nanovllm.models.tokenizer import Tokenizer
from nanovllm.outputs import (
    CompletionOutput,
    Logprob,
    PromptLogprobs,
    RequestMetrics,
    RequestOutput,
)
from nanovllm.sampling_params import RequestOutputKind


@dataclass(slots=True)
class TokenCounters:
    prompt_tokens: int = 0  # of requests that produced their first token
    generation_tokens: int = 0
    finished_requests: int = 0


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, eos_token_ids: list[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.counters = TokenCounters()
        self.step_index = 0
        self.iteration = IterationStats()  # the latest step's
        # The latest step's requests that finished, and that sampled their first token.
        self.finished: list[Request] = []
        self.first_sampled: list[Request] = []

    def add_sequence(self, seq: Sequence) -> None:
        params = seq.params
        seq.detokenizer = IncrementalDetokenizer(
            self.tokenizer,
            seq.request.prompt_token_ids,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
        )

    # ---- the step ------------------------------------------------------------------------------
    def process(self, step: SchedulerOutput, result: RunnerOutput, now: float) -> list[Request]:
        """Append the step's tokens; the requests that have an output to report, in order."""
        self.step_index += 1
        self.iteration = IterationStats(num_tokens=step.num_tokens)
        self.finished, self.first_sampled = [], []
        touched: dict[str, Request] = {}
        for item, sampled in zip(step.scheduled, result.seqs, strict=True):
            if sampled.prompt_logprobs:
                _add_prompt_logprobs(item.seq.request, sampled)
            if sampled.token_ids:
                self._append_all(item.seq, sampled, now)
                if self._reports(item.seq):
                    touched[item.seq.request.request_id] = item.seq.request
        return list(touched.values())

    def _append_all(self, seq: Sequence, sampled: SampledSeq, now: float) -> None:
        seq.delta_step, seq.delta_start = self.step_index, seq.num_output_tokens
        if seq.first_token_time is None:
            seq.first_token_time = now
            if seq.index == 0:
                self.counters.prompt_tokens += seq.num_prompt_tokens
                self.iteration.time_to_first_tokens.append(now - seq.request.arrival_time)
                self.first_sampled.append(seq.request)
        else:
            self.iteration.inter_token_latencies.append(now - seq.last_token_time)
        seq.last_token_time = now
        for token, logprobs in zip(sampled.token_ids, sampled.logprobs, strict=True):
            self._append(seq, token, logprobs)
            if seq.finish_reason is not None:
                break
        self._settle(seq, now)

    def _settle(self, seq: Sequence, now: float) -> None:
        if seq.params.output_kind is not RequestOutputKind.FINAL_ONLY:  # else nobody reads it
            seq.delta_text = seq.detokenizer.take_delta(seq.finish_reason is not None)
        request = seq.request
        if seq.finish_reason is not None and request.is_finished:
            request.finish_time = now
            self.counters.finished_requests += 1
            self.finished.append(request)

    def _append(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None) -> None:
        if seq.constraint is not None and not seq.constraint.accept(token):
            # Only a mask that allowed nothing lets this happen (e.g. allowed_token_ids outside
            # the grammar): the output so far stays valid, and the request says why it ended.
            self._fail_now(seq, f"token {token} is not allowed by the request's constraints "
                           "(structured output, allowed_token_ids, bad_words): they leave no "
                           f"token allowed after {seq.num_output_tokens} output tokens")  # fmt: skip
            return
        seq.token_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        self.counters.generation_tokens += 1
        self._check_stop(seq, token)

    def fail(self, seq: Sequence, error: str, now: float) -> None:
        """End a sequence that cannot go on (its grammar did not compile) with an error."""
        seq.delta_step, seq.delta_start = self.step_index, seq.num_output_tokens
        self._fail_now(seq, error)
        self._settle(seq, now)

    def _fail_now(self, seq: Sequence, error: str) -> None:
        seq.error = error
        self._finish(seq, "error")

    def _check_stop(self, seq: Sequence, token: int) -> None:
        params, num_out = seq.params, seq.num_output_tokens
        can_stop = num_out > params.min_tokens  # vLLM: stop rules apply from token min_tokens + 1
        stop_token = can_stop and (
            token in params.stop_token_ids
            or (not params.ignore_eos and token in self.eos_token_ids)
        )
        if stop_token and not params.include_stop_str_in_output:
            stop_string = None
        else:
            stop_string = seq.detokenizer.add_tokens([token], check_stop=can_stop)
        if stop_token:
            self._finish(seq, "stop", token if token in params.stop_token_ids else None)
        elif stop_string is not None:
            self._finish(seq, "stop", stop_string)
        elif seq.constraint is not None and seq.constraint.is_finished:
            self._finish(seq, "stop")
        elif num_out >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")

    @staticmethod
    def _finish(seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        # The flush may complete a stop string held back with a partial character.
        late_stop = seq.detokenizer.finish()
        if reason == "length" and late_stop is not None:
            reason, stop_reason = "stop", late_stop
        seq.finish_reason, seq.stop_reason = reason, stop_reason

    @staticmethod
    def _reports(seq: Sequence) -> bool:
        """FINAL_ONLY requests report once, when their last sequence finishes."""
        request = seq.request
        if request.params.output_kind is not RequestOutputKind.FINAL_ONLY:
            return True
        return seq.finish_reason is not None and request.is_finished

    # ---- outputs -------------------------------------------------------------------------------
    def output(self, request: Request) -> RequestOutput:
        """The request's RequestOutput after the latest step; changes nothing."""
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[self._completion(seq) for seq in request.seqs],
            finished=request.is_finished,
            metrics=_metrics(request),
            prompt_logprobs=self._prompt_logprobs(request),
        )

    def _prompt_logprobs(self, request: Request) -> PromptLogprobs | None:
        """vLLM's shape; a DELTA request gets them once, with its first output."""
        if request.params.prompt_logprobs is None:
            return None
        first = request.seqs[0]
        if request.params.output_kind is RequestOutputKind.DELTA and not (
            first.delta_step == self.step_index and first.delta_start == 0
        ):
            return None
        return [None] + [self._logprob_dict(entry) for entry in request.prompt_logprobs]

    def _logprob_dict(self, entry: TokenLogprobs) -> dict[int, Logprob]:
        """The scored token first, then the most likely ones (vLLM's order)."""

        def text(token_id: int) -> str:
            return self.tokenizer.decode([token_id], skip_special_tokens=False)

        out = {entry.token_id: Logprob(entry.logprob, entry.rank, text(entry.token_id))}
        for rank, (token_id, logprob) in enumerate(entry.top, 1):
            if token_id not in out:
                out[token_id] = Logprob(logprob, rank, text(token_id))
        return out

    def _completion(self, seq: Sequence) -> CompletionOutput:
        if seq.params.output_kind is RequestOutputKind.FINAL_ONLY:  # its one output: everything
            start, delta_text = 0, seq.detokenizer.text
        elif seq.delta_step == self.step_index:
            start, delta_text = seq.delta_start, seq.delta_text
        else:  # the latest step added nothing to this sample
            start, delta_text = seq.num_output_tokens, ""
        delta_ids = seq.token_ids[seq.num_prompt_tokens + start :]
        want_logprobs = seq.params.logprobs is not None
        delta_logprobs = seq.logprobs[start:] if want_logprobs else None
        if seq.params.output_kind is RequestOutputKind.DELTA:
            text, token_ids, logprobs = delta_text, delta_ids, delta_logprobs
        else:
            text, token_ids = seq.detokenizer.text, seq.output_token_ids
            logprobs = list(seq.logprobs) if want_logprobs else None
        return CompletionOutput(
            index=seq.index,
            text=text,
            token_ids=token_ids,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=logprobs,
            delta_text=delta_text,
            delta_token_ids=delta_ids,
            delta_logprobs=delta_logprobs,
            error=seq.error,
        )


def _add_prompt_logprobs(request: Request, sampled: SampledSeq) -> None:
    """Keep the entries of prompt tokens not scored yet: a prefill recomputed after preemption
    scores its first tokens again."""
    skip = len(request.prompt_logprobs) + 1 - sampled.prompt_logprobs_start
    if skip >= 0:
        request.prompt_logprobs.extend(sampled.prompt_logprobs[skip:])


def _metrics(request: Request) -> RequestMetrics:
    seqs = request.seqs
    first_times = [s.first_token_time for s in seqs if s.first_token_time is not None]
    last_times = [s.last_token_time for s in seqs if s.last_token_time is not None]
    return RequestMetrics(
        arrival_time=request.arrival_time,
        first_token_time=min(first_times) if first_times else None,
        finish_time=request.finish_time,
        num_prompt_tokens=request.num_prompt_tokens,
        num_generation_tokens=sum(s.num_output_tokens for s in seqs),
        scheduled_time=request.scheduled_time,
        last_token_time=max(last_times) if last_times else None,
        max_num_generation_tokens=max((s.num_output_tokens for s in seqs), default=0),
    )
