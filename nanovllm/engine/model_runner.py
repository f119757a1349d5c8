"""ModelRunner: all array work of a step — build the flat batch, run the model once, sample.

The batch is flat: the new tokens of every scheduled sequence (prefill chunks and decodes
alike) are concatenated; AttentionMetadata tells the attention op where each sequence's
queries start and how long its cached context is. Only the last row of a sequence whose
known tokens are all computed after this step goes through the LM head and the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nanovllm.backends.base import AttentionMetadata, Backend
from nanovllm.engine.sampler import SampleOutput, Sampler, SamplingRow
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.models.llama import LlamaForCausalLM


@dataclass(slots=True)
class StepInputs:
    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    query_start: np.ndarray
    context_lens: np.ndarray
    block_tables: np.ndarray
    sample_rows: np.ndarray  # flat-batch row of each sequence that gets a next token
    sample_seqs: list[Sequence]


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        backend: Backend,
        num_blocks: int,
        block_size: int,
        eos_token_ids: list[int],
        seed: int = 0,
    ) -> None:
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler(seed)
        cfg = model.config
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [
            (backend.zeros(shape), backend.zeros(shape)) for _ in range(cfg.num_layers)
        ]

    def kv_cache_bytes(self) -> int:
        k_cache = self.kv_caches[0][0]
        return 2 * len(self.kv_caches) * k_cache.size * k_cache.itemsize

    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], SampleOutput | None]:
        """Run one step; returns the sequences that got a next token and the sampler's output."""
        inputs = self.prepare(batch)
        hidden = self.forward(inputs)
        if not inputs.sample_seqs:
            return [], None
        logits = self.backend.to_numpy(self.model.compute_logits(hidden[inputs.sample_rows]))
        rows = [self._sampling_row(seq) for seq in inputs.sample_seqs]
        return inputs.sample_seqs, self.sampler(np.asarray(logits, dtype=np.float32), rows)

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        size = self.block_size
        ids, positions, slots = [], [], []
        query_start, context_lens, sample_rows, sample_seqs = [0], [], [], []
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            ids.extend(seq.token_ids[start:end])
            pos = np.arange(start, end)
            positions.append(pos)
            table = np.asarray(seq.block_table)
            slots.append(table[pos // size] * size + pos % size)
            query_start.append(query_start[-1] + num_new)
            context_lens.append(end)
            if end == seq.num_tokens:
                sample_rows.append(query_start[-1] - 1)
                sample_seqs.append(seq)
        width = max(len(seq.block_table) for seq in batch.seqs)
        tables = np.zeros((len(batch.seqs), width), dtype=np.int32)
        for row, seq in enumerate(batch.seqs):
            tables[row, : len(seq.block_table)] = seq.block_table
        return StepInputs(
            input_ids=np.asarray(ids, dtype=np.int64),
            positions=np.concatenate(positions).astype(np.int64),
            slot_mapping=np.concatenate(slots).astype(np.int64),
            query_start=np.asarray(query_start, dtype=np.int32),
            context_lens=np.asarray(context_lens, dtype=np.int32),
            block_tables=tables,
            sample_rows=np.asarray(sample_rows, dtype=np.int64),
            sample_seqs=sample_seqs,
        )

    def forward(self, inputs: StepInputs):
        xp = self.backend.asarray
        meta = AttentionMetadata(
            slot_mapping=xp(inputs.slot_mapping),
            block_tables=xp(inputs.block_tables),
            query_start=xp(inputs.query_start),
            context_lens=xp(inputs.context_lens),
            block_size=self.block_size,
            query_start_host=inputs.query_start,
            context_lens_host=inputs.context_lens,
            block_tables_host=inputs.block_tables,
        )
        return self.model.forward(xp(inputs.input_ids), xp(inputs.positions), meta, self.kv_caches)

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        return SamplingRow(
            params=seq.params,
            prompt_token_ids=seq.request.prompt_token_ids,
            output_token_ids=seq.output_token_ids,
            generator=seq.generator,
            eos_token_ids=self.eos_token_ids,
        )
