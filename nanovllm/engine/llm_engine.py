"""LLMEngine: take requests, step the parts, hand back outputs.

One engine is single-threaded: the offline `LLM` calls `step()` in a loop, the server calls it
from one background thread. A step is the step contract (nanovllm/engine/step.py):

    structured.resolve()            # sequences whose grammar compiled may now be scheduled
    scheduled = scheduler.schedule()
    result = runner.execute(scheduled)
    touched = processor.process(scheduled, result)
    scheduler.update(scheduled, result)

The engine is built from ready parts by nanovllm/engine/assembly.py (`build_engine`).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.output_processor import OutputProcessor
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Request, Sequence, sequence_generator
from nanovllm.engine.stats import EngineSnapshot, EngineStats, IterationStats, SequenceView
from nanovllm.engine.structured_outputs import StructuredOutputs
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams


@dataclass(slots=True)
class ModelInfo:
    """What the engine's front ends need to know about the model it serves."""

    model_config: object  # nanovllm.models.model_config.ModelConfig
    tokenizer: object  # nanovllm.models.tokenizer.Tokenizer
    generation_config: dict
    eos_token_ids: list[int]
    max_model_len: int


class LLMEngine:
    def __init__(
        self,
        config,
        info: ModelInfo,
        scheduler: Scheduler,
        runner: ModelRunner,
        processor: OutputProcessor,
        structured: StructuredOutputs | None = None,
    ) -> None:
        self.config = config
        self.model_config = info.model_config
        self.tokenizer = info.tokenizer
        self.generation_config = info.generation_config
        self.eos_token_ids = info.eos_token_ids
        self.max_model_len = info.max_model_len
        self.scheduler = scheduler
        self.block_manager: BlockManager = scheduler.block_manager
        self.runner = runner
        self.processor = processor
        self.structured = structured or StructuredOutputs(
            info.tokenizer, info.model_config.vocab_size, info.eos_token_ids,
            getattr(config, "reasoning_parser", None),
        )  # fmt: skip
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._num_steps = 0

    def default_sampling_params(self) -> SamplingParams:
        """vLLM's behaviour: the model's generation_config.json supplies the sampling defaults."""
        return SamplingParams.from_generation_config(self.generation_config)

    # ---- requests --------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        add_special_tokens: bool = True,
    ) -> Request:
        """Validate and queue a request. Raises ValueError with a clear message on bad input."""
        params = params or self.default_sampling_params()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.prompt_logprobs is not None and not self.runner.supports_prompt_logprobs:
            raise ValueError("prompt_logprobs is not supported with --tensor-parallel-size > 1")
        text, token_ids = self._tokenize(prompt, add_special_tokens)
        params = self._check_lengths(token_ids, params)
        params.validate_token_ids(self.model_config.vocab_size)
        request = Request(request_id, text, token_ids, params)
        self.structured.prepare(request)
        self._spawn(request)
        self.requests[request_id] = request
        return request

    def _tokenize(self, prompt, add_special_tokens: bool) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        if not isinstance(prompt, list | tuple) or not prompt:
            raise ValueError("prompt must be a non-empty string or a non-empty list of token ids")
        vocab = self.model_config.vocab_size
        for token in prompt:
            if (
                not isinstance(token, int | np.integer)
                or isinstance(token, bool)
                or not 0 <= token < vocab
            ):
                raise ValueError(f"prompt token id {token!r} is not in the vocabulary [0, {vocab})")
        return None, [int(t) for t in prompt]

    def _check_lengths(self, token_ids: list[int], params: SamplingParams) -> SamplingParams:
        limit = len(token_ids)
        if limit >= self.max_model_len:
            raise ValueError(
                f"prompt has {limit} tokens, but the maximum model length is {self.max_model_len} "
                f"(the prompt must leave room for at least one generated token)"
            )
        room = self.max_model_len - limit
        if params.max_tokens is None:
            return params.clone(max_tokens=room, min_tokens=min(params.min_tokens, room))
        if params.max_tokens > room:
            raise ValueError(
                f"this model's maximum length is {self.max_model_len} tokens; the request asks for "
                f"{limit + params.max_tokens} ({limit} in the prompt, {params.max_tokens} to generate)"
            )
        return params

    def _spawn(self, request: Request) -> None:
        """The request's next sample. The first waits in line; the others go right behind it
        once it has its first token, when the prompt is in the prefix cache."""
        index = len(request.seqs)
        params = request.params
        token_ids = list(request.prompt_token_ids)
        generator = sequence_generator(params.seed, index)
        seq = Sequence(next(self._seq_ids), request, index, token_ids, params, generator)
        self.processor.add_sequence(seq)
        self.structured.attach(seq)
        request.seqs.append(seq)
        if index == 0:
            self.scheduler.add(seq)
        else:
            self.scheduler.add_front(seq)

    def abort_request(self, request_id: str) -> bool:
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
        request.finish_time = time.monotonic()
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        failed = self._resolve_grammars()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            if not failed:
                self.structured.wait()  # only grammars still compiling: wait, do not spin
            return [self.processor.output(request) for request in failed]
        self._num_steps += 1
        result = self.runner.execute(scheduled)
        touched = self.processor.process(scheduled, result, time.monotonic())
        self.scheduler.update(scheduled, result)
        for request in self.processor.finished:
            self.requests.pop(request.request_id, None)
        for request in self.processor.first_sampled:
            # Its samples follow the first, whose prompt is cached now (unless the first failed).
            if request.params.n > 1 and not request.is_finished:
                for _ in range(len(request.seqs), request.params.n):
                    self._spawn(request)
        if failed:  # a sibling sample may have run this step: one output per request
            touched = [r for r in touched if all(r is not f for f in failed)]
        return [self.processor.output(request) for request in failed + touched]

    def _resolve_grammars(self) -> list[Request]:
        """Sequences whose grammar compiled join the queue; a grammar that failed to compile
        ends its request with finish_reason "error". The requests that failed."""
        failed: list[Request] = []
        for seq, error in self.structured.resolve():
            self.scheduler.finish(seq)
            self.processor.fail(seq, error, time.monotonic())
            if seq.request not in failed:
                failed.append(seq.request)
        for request in failed:
            if request.is_finished:
                self.requests.pop(request.request_id, None)
        return failed

    # ---- stats -----------------------------------------------------------------------------
    @property
    def iteration_stats(self) -> IterationStats:
        """What the latest step did (first tokens, inter-token latencies, tokens run)."""
        return self.processor.iteration

    def stats(self) -> EngineStats:
        manager, counters, spec = (
            self.block_manager,
            self.processor.counters,
            self.runner.spec_stats,
        )
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_blocks=manager.num_blocks,
            num_free_blocks=manager.num_free_blocks,
            num_cached_free_blocks=manager.num_cached_free_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=manager.query_tokens,
            prefix_cache_hits=manager.hit_tokens,
            prompt_tokens=counters.prompt_tokens,
            generation_tokens=counters.generation_tokens,
            num_finished_requests=counters.finished_requests,
            num_steps=self._num_steps,
            spec=None if spec is None else spec.snapshot(),
            num_constrained_requests=self.structured.num_constrained_requests,
            masks=self.runner.mask_stats.snapshot(),
        )

    def snapshot(self) -> EngineSnapshot:
        now = time.monotonic()
        views = [
            SequenceView(
                request_id=seq.request.request_id,
                index=seq.index,
                state=state,
                prompt_tokens=seq.num_prompt_tokens,
                output_tokens=seq.num_output_tokens,
                computed_tokens=seq.num_computed_tokens,
                num_blocks=self.block_manager.held_blocks(seq),
                age_s=now - seq.request.arrival_time,
            )
            for state, seqs in (
                ("running", self.scheduler.running),
                ("waiting", self.scheduler.waiting),
            )
            for seq in seqs
        ]
        return EngineSnapshot(views, self.block_manager.block_states())
