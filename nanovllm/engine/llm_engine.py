"""LLMEngine: add requests, step the scheduler and the model, turn tokens into outputs.

One engine is single-threaded: the offline `LLM` calls `step()` in a loop, the server calls it
from one background thread. Each step schedules a mixed batch, runs it, appends the sampled
tokens, detokenizes them incrementally, applies every stop rule and frees finished sequences.
"""

from __future__ import annotations

import itertools
import time

import numpy as np

from nanovllm.backends import get_backend
from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.model_runner import ForwardItem, ModelRunner
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.engine.sequence import Request, Sequence
from nanovllm.engine.spec_decode import SpecDecoder
from nanovllm.engine.stats import EngineSnapshot, EngineStats, SequenceView
from nanovllm.errors import NanovllmError
from nanovllm.models.loader import build_model, load_checkpoint
from nanovllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from nanovllm.sampling_params import RequestOutputKind, SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        checkpoint = load_checkpoint(config.model, config.tokenizer)
        self.model_config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.generation_config = checkpoint.generation_config
        self.eos_token_ids = self._eos_ids(checkpoint)
        backend = get_backend(config.device, config.dtype)
        model = build_model(checkpoint, backend, self._length_limit(config, checkpoint.config))
        if backend.name == "cuda":
            from nanovllm.check import startup_self_check

            startup_self_check(backend, head_dim=checkpoint.config.head_dim)
        config.num_blocks = self._num_blocks(config, checkpoint.config, backend)
        capacity = config.num_blocks * config.block_size
        if config.max_model_len is not None and config.max_model_len > capacity:
            raise NanovllmError(
                f"max_model_len {config.max_model_len} exceeds the KV cache capacity of {capacity} "
                f"tokens (num_blocks {config.num_blocks} x block_size {config.block_size}); "
                f"raise --num-blocks or lower --max-model-len"
            )
        # Without an explicit max_model_len, a lone sequence must still fit in the cache.
        self.max_model_len = min(self._length_limit(config, checkpoint.config), capacity)
        self.block_manager = BlockManager(
            config.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.runner = ModelRunner(
            model, backend, config.num_blocks, config.block_size, self.eos_token_ids, config.seed
        )
        if backend.name in ("cuda", "cuda-emulated") and not config.enforce_eager:
            self.runner.enable_decode_graphs(config.max_num_seqs, self.max_model_len)
        self.spec = self._speculator(config, backend)
        lookahead = self.spec.lookahead if self.spec is not None else None
        self.scheduler = Scheduler(config, self.block_manager, lookahead)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._touched: dict[str, Request] = {}
        self._counters = dict(prompt_tokens=0, generation_tokens=0, finished=0, steps=0)

    # ---- setup -----------------------------------------------------------------------------
    @staticmethod
    def _length_limit(config: EngineConfig, model_config) -> int:
        """max_model_len before the KV capacity caps it (so a lone sequence always fits)."""
        limit = model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise NanovllmError(
                f"max_model_len {config.max_model_len} exceeds the model's maximum length {limit}"
            )
        return config.max_model_len or limit

    @staticmethod
    def _num_blocks(config: EngineConfig, model_config, backend) -> int:
        """`--num-blocks auto` sizes the KV cache from free GPU memory, after the weights are loaded;
        without a GPU it falls back to the default of 512 blocks."""
        if config.num_blocks != "auto":
            return config.num_blocks
        if backend.name != "cuda":
            return 512
        from nanovllm.backends.cuda import activation_reserve_bytes, gpu_num_blocks

        cfg = model_config
        reserve = activation_reserve_bytes(
            cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size,
            config.max_num_batched_tokens, config.max_num_seqs, backend.dtype,
        )  # fmt: skip
        return gpu_num_blocks(
            cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, config.block_size, backend.dtype,
            config.gpu_memory_utilization, reserve,
        )  # fmt: skip

    def _speculator(self, config: EngineConfig, backend) -> SpecDecoder | None:
        if config.speculative_method is None:
            return None
        draft_runner = None
        if config.speculative_method == "draft":
            draft = load_checkpoint(config.draft_model)
            if draft.config.vocab_size != self.model_config.vocab_size:
                raise NanovllmError(
                    f"draft model {config.draft_model} has a vocabulary of {draft.config.vocab_size} "
                    f"tokens but the target has {self.model_config.vocab_size}; speculative decoding "
                    f"needs a draft that shares the target's vocabulary"
                )
            draft_model = build_model(draft, backend, self.max_model_len)
            draft_runner = ModelRunner(
                draft_model,
                backend,
                config.num_blocks,
                config.block_size,
                self.eos_token_ids,
                config.seed + 1,
            )
        return SpecDecoder(
            config.speculative_method,
            config.num_speculative_tokens,
            self.max_model_len,
            draft_runner,
            config.prompt_lookup_min,
            config.prompt_lookup_max,
        )

    def _eos_ids(self, checkpoint) -> list[int]:
        ids = list(checkpoint.config.eos_token_ids)
        gen_eos = checkpoint.generation_config.get("eos_token_id")
        ids += gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos]
        if checkpoint.tokenizer.eos_token_id is not None:
            ids.append(checkpoint.tokenizer.eos_token_id)
        return sorted({int(i) for i in ids})

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
        text, token_ids = self._tokenize(prompt, add_special_tokens)
        params = self._check_lengths(token_ids, params)
        request = Request(request_id, text, token_ids, params)
        self._spawn(request, 0)
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

    def _spawn(self, request: Request, index: int) -> Sequence:
        params = request.params
        # Any integer seed works (OpenAI allows negative ones); NumPy wants non-negative entropy.
        generator = (
            None if params.seed is None else np.random.default_rng((params.seed % 2**64, index))
        )
        seq = Sequence(
            next(self._seq_ids), request, index, list(request.prompt_token_ids), params, generator
        )
        seq.detokenizer = IncrementalDetokenizer(
            self.tokenizer,
            request.prompt_token_ids,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
        )
        request.seqs.append(seq)
        if index == 0:
            self.scheduler.add(seq)
        else:
            self.scheduler.add_front(seq)  # right behind its leader: the prompt is cached by now
        return seq

    def abort_request(self, request_id: str) -> bool:
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
        request.finish_time = time.monotonic()
        self._touched.pop(request_id, None)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        for seq in batch.preempted:
            seq.draft_computed = 0
        if batch:
            self._counters["steps"] += 1
            self._run(batch)
        outputs = [self._output(request) for request in self._touched.values()]
        self._touched.clear()
        return outputs

    def _run(self, batch: ScheduledBatch) -> None:
        """One forward of the target over the batch, then sampling (or verification of drafts)."""
        spec = self.spec
        drafts = spec.propose(batch) if spec is not None else {}
        items = [self._item(seq, num_new, drafts.get(seq)) for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True)]  # fmt: skip
        logits = self.runner.logits(items)
        results: list[tuple[Sequence, int, list[int], list]] = []
        plain, plain_rows, row = [], [], 0
        for item in items:
            seq, rows = item.seq, slice(row, row + item.num_logits)
            row += item.num_logits
            if seq in drafts:
                tokens, logprobs, consumed = spec.verify(
                    seq, drafts[seq], logits[rows], self.runner
                )
                results.append((seq, consumed, tokens, logprobs))
            elif item.num_logits:
                plain.append(seq)
                plain_rows.append(rows.start)
            else:
                results.append((seq, len(item.token_ids), [], []))
        if plain:
            # Without speculation every logits row is a plain one: no copy of [B, vocab].
            rows = logits if len(plain_rows) == len(logits) else logits[plain_rows]
            sampled = self.runner.sample(rows, plain)
            for seq, token, logprobs in zip(
                plain, sampled.token_ids.tolist(), sampled.logprobs, strict=True
            ):
                results.append((seq, seq.num_tokens - seq.num_computed_tokens, [token], [logprobs]))
        now = time.monotonic()
        for seq, consumed, tokens, logprobs in results:
            self._commit(seq, consumed, tokens, logprobs, now)

    def _item(self, seq: Sequence, num_new: int, proposal) -> ForwardItem:
        start = seq.num_computed_tokens
        if proposal is not None:  # the last token, then the drafts to verify
            return ForwardItem(
                seq, start, [seq.token_ids[-1], *proposal.token_ids], 1 + len(proposal.token_ids)
            )
        tokens = seq.token_ids[start : start + min(num_new, seq.num_tokens - start)]
        return ForwardItem(seq, start, tokens, 1 if start + len(tokens) == seq.num_tokens else 0)

    def _commit(
        self, seq: Sequence, consumed: int, tokens: list[int], logprobs: list, now: float
    ) -> None:
        """Mark `consumed` tokens computed, append new tokens until a stop rule fires."""
        seq.num_computed_tokens += consumed
        for token, token_logprobs in zip(tokens, logprobs, strict=True):
            self._append(seq, token, token_logprobs, now)
            if seq.finish_reason is not None:
                break
        self.block_manager.cache_computed_blocks(seq)
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)
            self._on_finished(seq, now)
        request = seq.request
        final_only = request.params.output_kind is RequestOutputKind.FINAL_ONLY
        if tokens and (not final_only or (seq.finish_reason is not None and request.is_finished)):
            self._touched[request.request_id] = request
        if seq.finish_reason is None and len(seq.block_table) > self.block_manager.blocks_needed(
            seq.num_tokens
        ):
            self.block_manager.trim(seq, seq.num_tokens)  # slots of rejected drafts

    def _append(self, seq: Sequence, token: int, logprobs, now: float) -> None:
        seq.token_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        if seq.first_token_time is None:
            seq.first_token_time = now
            self._on_first_token(seq)
        self._counters["generation_tokens"] += 1
        self._check_stop(seq, token)

    def _on_first_token(self, seq: Sequence) -> None:
        request = seq.request
        if seq.index == 0:
            self._counters["prompt_tokens"] += request.num_prompt_tokens
            for index in range(1, request.params.n):
                self._spawn(request, index)

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
            reason = token if token in params.stop_token_ids else None
            self._finish(seq, "stop", reason)
        elif stop_string is not None:
            self._finish(seq, "stop", stop_string)
        elif num_out >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        # The flush may complete a stop string held back with a partial character.
        late_stop = seq.detokenizer.finish()
        if reason == "length" and late_stop is not None:
            reason, stop_reason = "stop", late_stop
        seq.finish_reason, seq.stop_reason = reason, stop_reason

    def _on_finished(self, seq: Sequence, now: float) -> None:
        request = seq.request
        if request.is_finished:
            request.finish_time = now
            self._counters["finished"] += 1
            self.requests.pop(request.request_id, None)

    def _output(self, request: Request) -> RequestOutput:
        outputs = [self._completion(seq) for seq in request.seqs]
        first_times = [s.first_token_time for s in request.seqs if s.first_token_time is not None]
        metrics = RequestMetrics(
            arrival_time=request.arrival_time,
            first_token_time=min(first_times) if first_times else None,
            finish_time=request.finish_time,
            num_prompt_tokens=request.num_prompt_tokens,
            num_generation_tokens=sum(s.num_output_tokens for s in request.seqs),
        )
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=outputs,
            finished=request.is_finished,
            metrics=metrics,
        )

    def _completion(self, seq: Sequence) -> CompletionOutput:
        token_ids, sent = seq.output_token_ids, seq.num_sent_tokens
        seq.num_sent_tokens = len(token_ids)
        want_logprobs = seq.params.logprobs is not None
        delta_text = seq.detokenizer.take_delta(seq.is_finished)
        return CompletionOutput(
            index=seq.index,
            text=seq.detokenizer.text,
            token_ids=token_ids,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=list(seq.logprobs) if want_logprobs else None,
            delta_text=delta_text,
            delta_token_ids=token_ids[sent:],
            delta_logprobs=seq.logprobs[sent:] if want_logprobs else None,
        )

    # ---- stats -----------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        manager, counters = self.block_manager, self._counters
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_blocks=manager.num_blocks,
            num_free_blocks=manager.num_free_blocks,
            num_cached_free_blocks=manager.num_cached_free_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=manager.query_tokens,
            prefix_cache_hits=manager.hit_tokens,
            prompt_tokens=counters["prompt_tokens"],
            generation_tokens=counters["generation_tokens"],
            num_finished_requests=counters["finished"],
            num_steps=counters["steps"],
            spec=None if self.spec is None else self.spec.stats.snapshot(),
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
                num_blocks=len(seq.block_table),
                age_s=now - seq.request.arrival_time,
            )
            for state, seqs in (
                ("running", self.scheduler.running),
                ("waiting", self.scheduler.waiting),
            )
            for seq in seqs
        ]
        return EngineSnapshot(views, self.block_manager.block_states())
