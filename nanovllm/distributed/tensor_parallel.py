"""A tensor-parallel engine: one scheduler and sampler, the model split across T ranks.

The engine is the ordinary one (nanovllm/engine/assembly.py builds it) around a
`TensorParallelRunner`: it builds each step's flat batch, asks the proposer for guesses and
samples, exactly as ModelRunner does, but hands the forward to the ranks. Each rank
(`RankWorker`) holds its share of the weights (nanovllm/models/sharding.py) and of the KV cache
(its KV heads of every block; the block tables are the engine's, shared by all ranks), runs the
step's forward and computes its slice of the logits; rank 0 returns the gathered logits.

Where the ranks live:
- `LocalRanks`: all in this process on the CPU or the emulated device, in lock step with the
  reference communicator (nanovllm/distributed/communicator.py). The test oracle.
- `RayRanks` (nanovllm/distributed/ray_ranks.py): one Ray actor per GPU with NCCL. The engine
  process then samples on the CPU from the logits rank 0 sends back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from nanovllm.backends import get_backend
from nanovllm.backends.base import AttentionMetadata, Backend
from nanovllm.config import EngineConfig
from nanovllm.distributed.communicator import Communicator, ReferenceGroup
from nanovllm.engine.batch import ForwardItem, StepInputs, prepare
from nanovllm.engine.model_runner import ModelRunner, allocate_kv_cache
from nanovllm.engine.sampler import Sampler
from nanovllm.models.loader import Checkpoint, build_model
from nanovllm.models.model_config import ModelConfig
from nanovllm.models.sharding import ParallelRank, check_tensor_parallel, local_config


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
                    ParallelRank(rank, size, comm, checkpoint.config),
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


class WholeModel:
    """What the runner reads of the model it no longer holds: the whole model's config."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config


class TensorParallelRunner(ModelRunner):
    """ModelRunner with the forward on tensor-parallel ranks; batching, guesses and sampling
    stay here. Decode steps run eagerly (no CUDA graphs across ranks)."""

    def __init__(
        self,
        ranks: Ranks,
        config: ModelConfig,
        backend: Backend,
        block_size: int,
        sampler: Sampler,
        eos_token_ids: list[int],
        proposer=None,
        num_speculative_tokens: int = 0,
    ) -> None:
        super().__init__(
            WholeModel(config), backend, [], block_size, sampler, eos_token_ids, proposer,
            num_speculative_tokens,
        )  # fmt: skip
        self.ranks = ranks

    def eager_logits(self, items: list[ForwardItem]):
        inputs = prepare(items, self.block_size)
        return self.backend.asarray(self.ranks.execute(inputs, self.block_size))


def start_ranks(
    config: EngineConfig, checkpoint: Checkpoint, backend: Backend, max_positions: int
) -> tuple[Ranks, Backend]:
    """The loaded ranks of config.tensor_parallel_size, and the backend the engine samples on."""
    size = config.tensor_parallel_size
    check_tensor_parallel(checkpoint.config, size)
    backend.check_model(local_config(checkpoint.config, size))
    if backend.name != "cuda":
        return LocalRanks.reference(checkpoint, backend, max_positions, size), backend
    from nanovllm.distributed.ray_ranks import RayRanks

    # The GPUs belong to the ranks; the engine process samples on the CPU.
    return RayRanks(config, size, max_positions), get_backend("cpu")
