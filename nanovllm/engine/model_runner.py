"""ModelRunner: all array work of a step — build the flat batch, run the model once, sample.

The batch is flat: the new tokens of every scheduled sequence (prefill chunks, decodes and
speculative verification runs alike) are concatenated; AttentionMetadata tells the attention op
where each sequence's queries start and how long its cached context is. Only the rows that need
a next-token distribution go through the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nanovllm.backends.base import AttentionMetadata, Backend
from nanovllm.engine.cuda_graphs import DecodeGraphRunner
from nanovllm.engine.sampler import SampleOutput, Sampler, SamplingRow
from nanovllm.engine.sequence import Sequence
from nanovllm.models.llama import LlamaForCausalLM


@dataclass(slots=True)
class ForwardItem:
    """Tokens of one sequence to run from position `start`; the last `num_logits` need logits."""

    seq: Sequence
    start: int
    token_ids: list[int]
    num_logits: int


@dataclass(slots=True)
class StepInputs:
    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    query_start: np.ndarray
    context_lens: np.ndarray
    block_tables: np.ndarray
    logits_rows: np.ndarray  # flat-batch rows that go through the LM head


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
        self.sampler = Sampler(seed, xp=backend.xp)
        cfg = model.config
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [
            (backend.zeros(shape), backend.zeros(shape)) for _ in range(cfg.num_layers)
        ]
        self.decode_graphs: DecodeGraphRunner | None = None

    def enable_decode_graphs(self, max_batch: int, max_model_len: int) -> None:
        """Run decode-only steps padded to batch-size buckets: CUDA graphs on a GPU, the same
        padded step eagerly on the emulated device (nanovllm/engine/cuda_graphs.py)."""
        self.decode_graphs = DecodeGraphRunner(
            self.model, self.backend, self.kv_caches, self.block_size, max_batch, max_model_len
        )

    def kv_cache_bytes(self) -> int:
        k_cache = self.kv_caches[0][0]
        return 2 * len(self.kv_caches) * k_cache.size * k_cache.itemsize

    def logits(self, items: list[ForwardItem]):
        """Run the model once over all items; float32 logits of the requested rows, in order.
        They stay on the backend (a GPU's sampler works on them there)."""
        graphs = self.decode_graphs
        if graphs is not None and graphs.accepts(items):
            return graphs.logits(items)
        return self.eager_logits(items)

    def eager_logits(self, items: list[ForwardItem]):
        inputs = self.prepare(items)
        hidden = self.forward(inputs)
        xp = self.backend.xp
        if not len(inputs.logits_rows):
            return xp.empty((0, self.model.config.vocab_size), dtype=xp.float32)
        logits = self.model.compute_logits(hidden[self.backend.asarray(inputs.logits_rows)])
        return logits.astype(xp.float32, copy=False)

    def sample(self, logits: np.ndarray, seqs: list[Sequence]) -> SampleOutput:
        return self.sampler(logits, [self.sampling_row(seq) for seq in seqs])

    def sampling_row(self, seq: Sequence, extra_output: list[int] = ()) -> SamplingRow:
        """The row for seq's next token; extra_output are tokens assumed appended (speculation)."""
        params = seq.params
        # Only penalties and min_tokens read the output so far; skip copying it otherwise.
        needs_output = (
            params.min_tokens or params.repetition_penalty != 1.0
            or params.frequency_penalty or params.presence_penalty
        )  # fmt: skip
        output = seq.output_token_ids if needs_output else []
        return SamplingRow(
            params=seq.params,
            prompt_token_ids=seq.request.prompt_token_ids,
            output_token_ids=output + list(extra_output) if extra_output else output,
            generator=seq.generator,
            eos_token_ids=self.eos_token_ids,
        )

    def prepare(self, items: list[ForwardItem]) -> StepInputs:
        size = self.block_size
        ids, positions, slots = [], [], []
        query_start, context_lens, logits_rows = [0], [], []
        for item in items:
            start, end = item.start, item.start + len(item.token_ids)
            ids.extend(item.token_ids)
            table = item.seq.block_table
            if end - start == 1:  # a decode: plain ints are far cheaper than tiny arrays
                positions.append(start)
                slots.append(table[start // size] * size + start % size)
            else:
                pos = np.arange(start, end)
                positions.extend(pos.tolist())
                slots.extend((np.asarray(table)[pos // size] * size + pos % size).tolist())
            query_start.append(query_start[-1] + end - start)
            context_lens.append(end)
            logits_rows.extend(range(query_start[-1] - item.num_logits, query_start[-1]))
        width = max(len(item.seq.block_table) for item in items)
        tables = np.zeros((len(items), width), dtype=np.int32)
        for row, item in enumerate(items):
            tables[row, : len(item.seq.block_table)] = item.seq.block_table
        return StepInputs(
            input_ids=np.asarray(ids, dtype=np.int64),
            positions=np.asarray(positions, dtype=np.int64),
            slot_mapping=np.asarray(slots, dtype=np.int64),
            query_start=np.asarray(query_start, dtype=np.int32),
            context_lens=np.asarray(context_lens, dtype=np.int32),
            block_tables=tables,
            logits_rows=np.asarray(logits_rows, dtype=np.int64),
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
