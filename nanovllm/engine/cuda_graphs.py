"""Decode steps as CUDA graphs, one per batch-size bucket: a step costs a few copies and one
graph launch instead of hundreds of Python-issued kernel launches.

A decode-only step (one new token per sequence, every sequence needing logits) of n sequences
runs as the graph of the smallest bucket >= n (1, 2, 4, 8, then every multiple of 8 up to
max_num_seqs). A graph reads its inputs from static buffers, the ones it was captured on: the
step's rows go into the first n rows, and rows n..bucket are padding that is harmless by
construction — slot -1 (write_kv skips negative slots, so nothing is written), query length 1,
context length 1 and block table row of zeros (paged attention reads key 0 of block 0, which
always exists), token 0 at position 0; their logits are computed and dropped.

What runs where:
- On the GPU and on the emulated device alike: bucket choice, the static buffers and their
  padding, the padded forward that a graph holds, the check of each bucket's first replay
  against an eager step of the same inputs, and the fall-back to eager decoding for good when
  they differ. With plain NumPy as the emulated device's arrays the padded forward runs eagerly
  at each step where a GPU would replay it.
- Where the backend's array module is CuPy (`backend.captures_graphs`): `CapturedGraphs` —
  capture into a private memory pool, replay — and asynchronous uploads on the current stream.
  The tests run this path on the emulated device against a stand-in for CuPy that enforces
  its capture rules and replays what was captured (tests/_fake_cupy.py); only pinned host
  buffers (`_host_empty`) are GPU-only. The engine's start-up captures and then runs
  `self_check`, which compares a replay of every bucket with the eager step before any request
  is served.

Host-device synchronization: a replayed step adds none. The uploads are asynchronous copies from
pinned memory on the current stream, the graph is launched on that stream, and the logits stay
on the device for the sampler, whose sampled token ids coming back are the step's one sync.
Each bucket's first replay is the exception: comparing it with the eager step syncs once.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

from nanovllm.backends.base import Array, AttentionInputs, AttentionMetadata, slot_of
from nanovllm.engine.batch import ForwardItem
from nanovllm.engine.graph_capture import CapturedGraphs

if TYPE_CHECKING:
    from nanovllm.backends.cuda import CUDABackend
    from nanovllm.models.llama import KVCache, LlamaForCausalLM

logger = logging.getLogger("nanovllm.engine")

# A replay may differ from the eager step by rounding (cuBLAS may pick another algorithm for
# another row count), never by more: a replay reading stale memory is off by O(1) or more.
# Relative to max(1, the largest |logit|).
TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float16): 2e-2}

Row = tuple[int, int, Sequence[int]]  # (token id, position, block table) of one sequence


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes that get a graph: 1, 2, 4, 8, then every multiple of 8, and max_batch."""
    small = [size for size in (1, 2, 4, 8) if size < max_batch]
    return small + list(range(16, max_batch, 8)) + [max_batch]


def bucket_for(buckets: list[int], batch: int) -> int:
    """The smallest bucket that holds `batch` rows."""
    return buckets[bisect.bisect_left(buckets, batch)]


@dataclass(slots=True)
class DecodeBuffers:
    """The inputs of a padded decode step, max_batch rows; a bucket uses the first rows."""

    input_ids: Array  # [max_batch] int64
    positions: Array  # [max_batch] int64
    slot_mapping: Array  # [max_batch] int64, -1 on padding rows
    context_lens: Array  # [max_batch] int32
    query_start: Array  # [max_batch + 1] int32: 0, 1, 2, ... (one query token per row)
    block_tables: Array  # [max_batch, max_blocks] int32

    @classmethod
    def padded(cls, max_batch: int, max_blocks: int, empty: Callable) -> DecodeBuffers:
        """Buffers whose every row is a padding row; empty(shape, dtype) allocates."""
        bufs = cls(
            input_ids=empty((max_batch,), np.int64),
            positions=empty((max_batch,), np.int64),
            slot_mapping=empty((max_batch,), np.int64),
            context_lens=empty((max_batch,), np.int32),
            query_start=empty((max_batch + 1,), np.int32),
            block_tables=empty((max_batch, max_blocks), np.int32),
        )
        bufs.query_start[:] = np.arange(max_batch + 1)
        bufs.pad(0, max_batch)
        return bufs

    def pad(self, start: int, stop: int) -> None:
        """Make rows start..stop padding rows."""
        self.input_ids[start:stop] = 0
        self.positions[start:stop] = 0
        self.slot_mapping[start:stop] = -1
        self.context_lens[start:stop] = 1
        self.block_tables[start:stop] = 0

    def map(self, fn: Callable[[Array], Array]) -> DecodeBuffers:
        return DecodeBuffers(*(fn(getattr(self, f.name)) for f in fields(self)))

    def attention(self, rows: int) -> AttentionInputs:
        """The attention inputs of the first `rows` rows."""
        return AttentionInputs(
            self.slot_mapping[:rows],
            self.block_tables[:rows],
            self.query_start[: rows + 1],
            self.context_lens[:rows],
        )


class DecodeGraphRunner:
    """Decode-only steps through padded, per-bucket static buffers: CUDA graphs on a GPU, the
    same padded step run eagerly on the emulated device."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        backend: CUDABackend,
        kv_caches: list[KVCache],
        block_size: int,
        max_batch: int,
        max_model_len: int,
    ) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.buckets = batch_buckets(max_batch)
        self.max_blocks = -(-max_model_len // block_size)
        self.host = DecodeBuffers.padded(max_batch, self.max_blocks, _host_empty(backend))
        self.device = self.host.map(backend.xp.array)  # a copy, padding included
        # One logits buffer for every bucket: graphs holding their own [bucket, vocab] outputs
        # would keep sum(buckets) rows alive (gigabytes for a large vocabulary and 256 seqs).
        vocab = model.config.vocab_size
        self.logits_out = backend.xp.empty((max_batch, vocab), dtype=backend.xp.float32)
        self.graphs: CapturedGraphs | None = None
        self.eager = False  # set for good when graphs fail or disagree with the eager step
        self.bucket_steps: Counter[int] = Counter()  # decode steps run per bucket
        self._checked: set[int] = set()  # buckets whose first replay was compared
        self._uploaded = None  # GPU: event after the last uploads, guarding the pinned buffers
        if backend.captures_graphs:
            self.capture()

    # ---- the step ----------------------------------------------------------------------------
    def accepts(self, items: list[ForwardItem]) -> bool:
        """A decode-only batch this runner can take: one token and one logits row per sequence."""
        return (
            not self.eager
            and 0 < len(items) <= self.buckets[-1]
            and all(
                len(item.token_ids) == 1
                and item.num_logits == 1
                and len(item.seq.block_table) <= self.max_blocks
                for item in items
            )
        )

    def logits(self, items: list[ForwardItem]) -> Array:
        """float32 logits [len(items), vocab] of a batch that `accepts` took, on the device."""
        rows = [(item.token_ids[0], item.start, item.seq.block_table) for item in items]
        bucket = bucket_for(self.buckets, len(rows))
        self._fill(bucket, rows)
        self.bucket_steps[bucket] += 1
        if bucket in self._checked:
            return self._replay(bucket)[: len(rows)]
        self._checked.add(bucket)
        return self._replay_checked(bucket, len(rows))

    def _fill(self, bucket: int, rows: list[Row]) -> None:
        """The step's rows into the host buffers, rows len(rows)..bucket padding."""
        if self._uploaded is not None:
            self._uploaded.synchronize()  # done long ago (the last step's sampling synced)
        host, size = self.host, self.block_size
        host.pad(len(rows), bucket)
        host.block_tables[: len(rows)] = 0
        for i, (token, position, table) in enumerate(rows):
            host.input_ids[i] = token
            host.positions[i] = position
            host.slot_mapping[i] = slot_of(table, position, size)
            host.context_lens[i] = position + 1
            host.block_tables[i, : len(table)] = table

    def _replay(self, bucket: int) -> Array:
        """Run the padded step of `bucket` on the uploaded inputs: logits [bucket, vocab]."""
        self._upload(bucket)
        if self.graphs is None:  # the emulated device: no graphs, the same step eagerly
            return self._forward(bucket)
        return self.graphs.replay(bucket)

    def _upload(self, bucket: int) -> None:
        """The first `bucket` rows of the host buffers to the device (query_start never changes)."""
        names = ("input_ids", "positions", "slot_mapping", "context_lens", "block_tables")
        pairs = [(getattr(self.device, n)[:bucket], getattr(self.host, n)[:bucket]) for n in names]
        if not self.backend.captures_graphs:  # NumPy arrays: a plain copy
            for device, host in pairs:
                device[...] = host
            return
        # Asynchronous copies on the current stream (from pinned memory on a GPU), ordered
        # before the graph launched after them; the event guards the host buffers.
        stream = self.backend.xp.cuda.get_current_stream()
        for device, host in pairs:
            device.set(host, stream)
        self._uploaded = stream.record()

    def _forward(self, bucket: int) -> Array:
        """The padded step on the static device buffers, into the shared logits buffer: what a
        graph holds (its matmuls on our kernels, captured or not)."""
        out = self.logits_out[:bucket]
        with self.backend.decode_matmuls():
            out[...] = self._step(self.device, bucket)
        return out

    def _step(self, bufs: DecodeBuffers, rows: int) -> Array:
        meta = AttentionMetadata.build(
            self.host.attention(rows), self.block_size, device=bufs.attention(rows)
        )  # launch geometry from the host copy: one query per row, `rows` sequences
        hidden = self.model.forward(
            bufs.input_ids[:rows], bufs.positions[:rows], meta, self.kv_caches
        )
        logits = self.model.compute_logits(hidden)
        return logits.astype(self.backend.xp.float32, copy=False)

    # ---- checking replays against the eager step ---------------------------------------------
    def _replay_checked(self, bucket: int, batch: int) -> Array:
        """A bucket's first replay, compared with the eager step of its `batch` real rows on
        fresh arrays (which rewrites the same keys and values into the cache). On a mismatch,
        warn, decode eagerly for good, and return the eager logits."""
        got = self._replay(bucket)[:batch]
        want = self._step(self.host.map(self.backend.xp.array), batch)
        error = relative_error(self.backend.to_numpy(got), self.backend.to_numpy(want))
        if error <= TOLERANCE[self.backend.dtype]:
            return got
        self.fall_back(
            f"the replay of batch-size bucket {bucket} differs from the eager step by {error:.3g} "
            f"(relative to the largest logit; tolerance {TOLERANCE[self.backend.dtype]:g})"
        )
        return want

    def self_check(self) -> bool:
        """Replay every bucket on a synthetic batch and compare it with the eager step; on a GPU
        the engine's start-up runs it right after capture. Row i is a sequence at position i
        with block table 0, 1, 2, ...: rows write distinct slots and row i attends to the keys
        of rows 0..i. It writes into the KV cache, so it must run before any request does."""
        vocab = self.model.config.vocab_size
        table = list(range(self.max_blocks))
        for bucket in self.buckets:
            rows = [((7 * i + 1) % vocab, i, table) for i in range(min(bucket, self.max_model_len))]
            self._fill(bucket, rows)
            self._replay_checked(bucket, len(rows))
            self._checked.add(bucket)  # its first replay is done: serving need not repeat it
            if self.eager:
                return False
        return True

    def fall_back(self, reason: str) -> None:
        logger.warning("CUDA graphs are off, decoding eagerly from now on: %s", reason)
        self.eager = True
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    # ---- CuPy only (a GPU, or the stand-in of the tests) ---------------------------------------
    def capture(self) -> None:
        """Capture every bucket's graph, then check each first replay (GPU start-up)."""
        try:
            self.graphs = CapturedGraphs(self.backend.xp, self._forward, self.buckets)
        except Exception as exc:  # a capture that fails must not stop the engine: run eagerly
            self.fall_back(f"capturing failed: {type(exc).__name__}: {exc}")
            return
        if self.self_check():
            logger.info("captured CUDA graphs for decode batch sizes %s", self.buckets)


def _host_empty(backend: CUDABackend) -> Callable:
    """Allocator of the host buffers: pinned memory on a GPU (asynchronous copies need it)."""
    if backend.emulated:
        return np.empty
    import cupyx

    return cupyx.empty_pinned


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """Largest |got - want| relative to max(1, largest |want|); inf for NaN or a shape mismatch."""
    if got.shape != want.shape:
        return float("inf")
    diff = float(np.nan_to_num(np.abs(got - want), nan=np.inf).max(initial=0.0))
    return diff / max(1.0, float(np.abs(want).max(initial=0.0)))
