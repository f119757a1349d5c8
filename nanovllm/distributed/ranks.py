"""Tensor-parallel ranks: each holds its share of the model and of the KV cache.

A `RankWorker` holds one rank's share of the weights (nanovllm/models/sharding.py) and of the
KV cache (its KV heads of every block; the block tables are the engine's, shared by all ranks).
Each step it runs the forward on the step's host inputs and computes its slice of the logits;
rank 0 returns the gathered logits. `LocalRanks` keeps every rank in this process, in lock step
with the reference communicator (nanovllm/distributed/communicator.py) or any communicators whose
collectives rendezvous the same way (tests/test_nccl.py); `RayRanks`
(nanovllm/distributed/ray_ranks.py) puts each rank in a Ray actor on its own GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from nanovllm.backends.base import AttentionMetadata, Backend
from nanovllm.config import EngineConfig
from nanovllm.distributed.communicator import Communicator, ReferenceGroup
from nanovllm.engine.batch import StepInputs
from nanovllm.engine.model_runner import allocate_kv_cache
from nanovllm.models.loader import Checkpoint, build_model
from nanovllm.models.sharding import ParallelRank


class RankWorker:
    """One rank: its share of the model and of the KV cache, on its own backend."""

    def __init__(self, model: Any, backend: Backend) -> None:
        self.model = model  # a family's model class on local_config, with `parallel` set
        self.backend = backend
        self.kv_caches: list = []

    def num_kv_blocks(self, config: EngineConfig) -> int | None:
        """Blocks this rank's free device memory holds (`--num-blocks auto`); None without
        device memory to size from."""
        memory = self.backend.memory_info()
        if memory is None:
            return None
        from nanovllm.backends.memory import kv_blocks_for_memory

        return kv_blocks_for_memory(config, [self.model.config], self.backend.dtype, *memory)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.kv_caches = allocate_kv_cache(self.backend, self.model.config, num_blocks, block_size)

    def execute(self, inputs: StepInputs, block_size: int) -> np.ndarray | None:
        """Run the step; rank 0 returns the float32 logits of inputs.logits_rows, on the host."""
        upload, host = self.backend.asarray, inputs.attention
        meta = AttentionMetadata.build(host, block_size, host.map(upload))
        ids, positions = upload(inputs.input_ids), upload(inputs.positions)
        hidden = self.model.forward(ids, positions, meta, self.kv_caches)
        if not len(inputs.logits_rows):  # every rank sees the same batch: none gathers
            logits = None
        else:
            logits = self.model.compute_logits(hidden[upload(inputs.logits_rows)])
        if self.model.parallel.rank != 0:
            return None
        vocab = self.model.parallel.config.vocab_size
        if logits is None:
            return np.empty((0, vocab), dtype=np.float32)
        return self.backend.to_numpy(logits).astype(np.float32, copy=False)


class Ranks(Protocol):
    def num_kv_blocks(self, config: EngineConfig) -> int | None: ...
    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None: ...
    def execute(self, inputs: StepInputs, block_size: int) -> np.ndarray: ...


class LocalRanks:
    """Every rank in this process, on one backend, in lock step: with the reference
    communicator, or with any communicators whose collectives rendezvous through `run`."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        backend: Backend,
        max_positions: int,
        comms: list[Communicator],
        run: Callable[[list[Callable[[], Any]]], list[Any]],
    ) -> None:
        self.run = run
        size = len(comms)
        # Loading calls no collective: the ranks load one after another.
        self.workers = [
            RankWorker(
                build_model(
                    checkpoint,
                    backend,
                    max_positions,
                    parallel=ParallelRank(rank, size, comm, checkpoint.config),
                ),
                backend,
            )  # fmt: skip
            for rank, comm in enumerate(comms)
        ]

    @classmethod
    def reference(
        cls, checkpoint: Checkpoint, backend: Backend, max_positions: int, size: int
    ) -> LocalRanks:
        group = ReferenceGroup(size, backend.xp)
        return cls(checkpoint, backend, max_positions, group.communicators(), group.run)

    def num_kv_blocks(self, config: EngineConfig) -> int | None:
        return self.workers[0].num_kv_blocks(config)  # one backend: the same memory

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        for worker in self.workers:
            worker.allocate_kv_cache(num_blocks, block_size)

    def execute(self, inputs: StepInputs, block_size: int) -> np.ndarray:
        steps = [functools.partial(w.execute, inputs, block_size) for w in self.workers]
        return self.run(steps)[0]
