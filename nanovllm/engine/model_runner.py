"""ModelRunner: all array work of a step. `execute` takes the scheduler's record of the step,
asks the proposer for guesses, runs the model once over the mixed batch (eagerly, or as a
captured decode graph), scores the prompt rows of prefills that asked for prompt logprobs,
masks constrained rows, and samples: plain decoding is verification with k = 0, so every
sequence goes through the sampler's one `verify`.
"""

from __future__ import annotations

import time

import numpy as np

from nanovllm.backends.base import AttentionMetadata, Backend
from nanovllm.engine.batch import ForwardItem, StepInputs, forward_item, prepare, sampling_row
from nanovllm.engine.cuda_graphs import DecodeGraphRunner
from nanovllm.engine.logprobs import TokenLogprobs
from nanovllm.engine.numerics import (
    NonFiniteLogitsError,
    all_finite,
    first_nonfinite,
    nonfinite_message,
)
from nanovllm.engine.prompt_logprobs import prompt_logprobs
from nanovllm.engine.sampler import SampledTokens, Sampler, VerifyGroup
from nanovllm.engine.spec_decode import Proposer, SpecStats, roll_back_draft
from nanovllm.engine.stats import MaskStats
from nanovllm.engine.step import RunnerOutput, SampledSeq, SchedulerOutput
from nanovllm.structured.bitmask import ALL_ALLOWED, bitmask_words

KVCache = tuple[object, object]


def allocate_kv_cache(
    backend: Backend, model_config, num_blocks: int, block_size: int
) -> list[KVCache]:
    """A model's KV cache: one (K, V) pair per layer, [num_blocks, block_size, Hkv, D] each."""
    shape = (num_blocks, block_size, model_config.num_kv_heads, model_config.head_dim)
    return [(backend.zeros(shape), backend.zeros(shape)) for _ in range(model_config.num_layers)]


class ModelRunner:
    supports_prompt_logprobs = True

    def __init__(
        self,
        model,
        backend: Backend,
        kv_caches: list[KVCache],
        block_size: int,
        sampler: Sampler,
        eos_token_ids: list[int],
        proposer: Proposer | None = None,
        num_speculative_tokens: int = 0,
    ) -> None:
        self.model = model  # forward(ids, positions, meta, kv_caches) and compute_logits(hidden)
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sampler = sampler
        self.eos_token_ids = eos_token_ids
        self.proposer = proposer
        self.spec_stats = SpecStats(num_speculative_tokens) if proposer is not None else None
        self.decode_graphs: DecodeGraphRunner | None = None
        self.mask_stats = MaskStats()

    def enable_decode_graphs(self, max_batch: int, max_model_len: int) -> None:
        """Run decode-only steps padded to batch-size buckets: CUDA graphs on a GPU, the same
        padded step eagerly on the emulated device (nanovllm/engine/cuda_graphs.py)."""
        self.decode_graphs = DecodeGraphRunner(
            self.model, self.backend, self.kv_caches, self.block_size, max_batch, max_model_len
        )

    # ---- the step ------------------------------------------------------------------------------
    def execute(self, step: SchedulerOutput) -> RunnerOutput:
        wanted = [item for item in step.scheduled if item.num_spec_tokens]
        proposals = self.proposer.propose(wanted) if self.proposer and wanted else {}
        items = [forward_item(item, proposals.get(item.seq)) for item in step.scheduled]
        logits, scored = self._run(items)
        sampled = iter(self._sample(items, logits))
        return RunnerOutput(
            [
                self._result(item, next(sampled), lps)
                for item, lps in zip(items, scored, strict=True)
            ]
        )

    def _result(
        self, item: ForwardItem, sampled: SampledTokens | None, scored: list[TokenLogprobs]
    ) -> SampledSeq:
        prompt = {"prompt_logprobs": scored, "prompt_logprobs_start": item.start + 1}
        if sampled is None:  # mid-prefill: nothing to sample yet
            return SampledSeq([], [], len(item.token_ids), **prompt)
        k = item.num_proposed
        if item.proposal is not None:
            self.spec_stats.record(k, sampled.num_accepted)
            roll_back_draft(item.seq, sampled.num_accepted)
        return SampledSeq(
            sampled.token_ids,
            sampled.logprobs,
            num_computed=len(item.token_ids) - (k - sampled.num_accepted),
            num_drafted=k,
            num_accepted=sampled.num_accepted,
            **prompt,
        )

    def _sample(self, items: list[ForwardItem], logits) -> list[SampledTokens | None]:
        """One SampledTokens per item with logits rows, None for the others."""
        groups = [self._group(item) for item in items if item.num_logits]
        self._apply_constraints([item for item in items if item.num_logits], logits)
        verdicts = iter(self.sampler.verify(logits, groups) if groups else [])
        return [next(verdicts) if item.num_logits else None for item in items]

    def _group(self, item: ForwardItem) -> VerifyGroup:
        seq, eos = item.seq, self.eos_token_ids
        if item.proposal is None:
            return VerifyGroup([sampling_row(seq, eos)], [], None)
        guesses = item.proposal.token_ids
        rows = [sampling_row(seq, eos, guesses[:i]) for i in range(len(guesses) + 1)]
        return VerifyGroup(rows, guesses, item.proposal.probs)

    def _apply_constraints(self, items: list[ForwardItem], logits) -> None:
        """Mask each constrained sequence's rows (all k + 1 when verifying) before sampling: the
        step's masks in one batched fill, applied where the logits live."""
        rows, jobs, start = [], [], 0
        for item in items:
            if item.seq.constraint is not None:
                guesses = item.proposal.token_ids if item.proposal is not None else []
                jobs.append((item.seq.constraint, guesses))
                rows.extend(range(start, start + item.num_logits))
            start += item.num_logits
        if not rows:
            return
        from nanovllm.structured.constraint import fill_bitmasks  # loads llguidance

        started = time.perf_counter()
        masks = np.empty((len(rows), bitmask_words(logits.shape[1])), dtype=np.int32)
        fill_bitmasks(jobs, masks)
        # A row that allows nothing (allowed_token_ids outside the grammar) would be all -inf:
        # allow everything there; the constraint then refuses the token and the request ends.
        masks[~masks.any(axis=1)] = ALL_ALLOWED
        filled = time.perf_counter()
        self.backend.apply_token_bitmask(logits, masks, np.asarray(rows))
        applied = time.perf_counter()
        self.mask_stats.record(len(jobs), len(rows), filled - started, applied - filled)

    # ---- the model -----------------------------------------------------------------------------
    def logits(self, items: list[ForwardItem]):
        """Run the model once over all items; float32 logits of the rows to sample, in order.
        They stay on the backend (a GPU's sampler works on them there). Logits that are not
        finite stop the step (nanovllm/engine/numerics.py)."""
        return self._run(items)[0]

    def eager_logits(self, items: list[ForwardItem]):
        return self._eager(items)[0]

    def _run(self, items: list[ForwardItem]) -> tuple[object, list[list[TokenLogprobs]]]:
        """The logits to sample, and per item the logprobs of the prompt tokens it scored."""
        graphs = self.decode_graphs
        if graphs is not None and graphs.accepts(items):  # decodes only: no prompt rows
            logits = graphs.logits(items)
            if all_finite(self.backend.xp, logits):
                return logits, [[] for _ in items]
            # A replay gone wrong must not be mistaken for the model's overflow.
            graphs.fall_back("a replay gave logits that are not finite")
        return self._eager(items)

    def _guard(self, items: list[ForwardItem], checked, logits) -> None:
        """Stop the step if `checked` (its logits, or what they were computed from) is not
        finite."""
        if not all_finite(self.backend.xp, checked):
            self._report_nonfinite(items, logits)

    def _report_nonfinite(self, items: list[ForwardItem], logits) -> None:
        xp = self.backend.xp
        bad = int((~xp.isfinite(logits).all(axis=1)).sum())
        inputs = prepare(items, self.block_size)
        where = first_nonfinite(lambda inspect: self.forward(inputs, inspect), xp)
        layers = self.model.config.num_layers
        raise NonFiniteLogitsError(
            nonfinite_message(bad, len(logits), where, layers, self.backend.dtype)
        )

    def _eager(self, items: list[ForwardItem]) -> tuple[object, list[list[TokenLogprobs]]]:
        inputs = prepare(items, self.block_size)
        hidden = self.forward(inputs)
        scored = prompt_logprobs(self.model, self.backend, hidden, inputs, items)
        xp = self.backend.xp
        if not len(inputs.logits_rows):
            return xp.empty((0, self.model.config.vocab_size), dtype=xp.float32), scored
        sampled = hidden[self.backend.asarray(inputs.logits_rows)]
        logits = self.model.compute_logits(sampled).astype(xp.float32, copy=False)
        # In float32 the logits of finite hidden rows are finite (an overflow would need a logit
        # past 3.4e38): the guard reads the [B, H] rows, not the [B, V] logits (256 x 49,152
        # floats took ~6 ms a step on the CPU). float16 overflows: its logits are checked.
        self._guard(items, sampled if sampled.dtype == xp.float32 else logits, logits)
        return logits, scored

    def forward(self, inputs: StepInputs, inspect=None):
        upload, host = self.backend.asarray, inputs.attention
        meta = AttentionMetadata.build(host, self.block_size, host.map(upload))
        ids, positions = upload(inputs.input_ids), upload(inputs.positions)
        if inspect is None:
            return self.model.forward(ids, positions, meta, self.kv_caches)
        return self.model.forward(ids, positions, meta, self.kv_caches, inspect=inspect)
