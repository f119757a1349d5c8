"""Tensor-parallel ranks as Ray actors: one GPU each, all-reducing through NCCL.

The engine process keeps the scheduler and the sampler (TensorParallelRunner); each step it puts
the step's host inputs into Ray's object store once and every rank runs the forward on them;
rank 0 sends back the gathered float32 logits of the rows that sample. All ranks sit in one
placement group packed on one node (`STRICT_PACK`): NCCL between GPUs of one machine (NVLink or
PCIe) is what makes per-layer all-reduces affordable.

Start-up is NCCL's handshake: rank 0 creates the unique id, and every rank builds its
communicator at the same time (`ncclCommInitRank` waits for the whole group), then loads its
share of the checkpoint from its own copy of the model path.

What was verified where: the rank code (RankWorker, the sharded model, NcclCommunicator) runs in
tests on the emulated device against a stand-in for `cupy.cuda.nccl`; this module's Ray glue
needs several GPUs and has not run on real ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nanovllm.backends import get_backend
from nanovllm.config import EngineConfig
from nanovllm.distributed import ray_runtime
from nanovllm.distributed.nccl import NcclCommunicator, new_unique_id
from nanovllm.distributed.ranks import RankWorker
from nanovllm.engine.batch import StepInputs
from nanovllm.models.loader import build_model, load_checkpoint
from nanovllm.models.sharding import ParallelRank

START_TIMEOUT_S = 600.0  # placing the group and loading every rank's weights


class RankActor:
    """One rank in its own process; Ray makes exactly one GPU visible to it (device 0)."""

    def __init__(self, config: EngineConfig, rank: int, size: int, max_positions: int) -> None:
        self.config, self.rank, self.size = config, rank, size
        self.max_positions = max_positions
        self.backend = get_backend("cuda", config.dtype, quantization=config.quantization)
        self.comm: NcclCommunicator | None = None
        self.worker: RankWorker | None = None

    def unique_id(self) -> tuple[int, ...]:
        return new_unique_id()

    def connect(self, unique_id: tuple[int, ...]) -> None:
        """Join the NCCL group; returns once every rank has joined."""
        self.comm = NcclCommunicator(unique_id, self.rank, self.size, self.backend.xp)

    def load(self) -> None:
        checkpoint = load_checkpoint(self.config.model, self.config.tokenizer)
        parallel = ParallelRank(self.rank, self.size, self.comm, checkpoint.config)
        model = build_model(checkpoint, self.backend, self.max_positions, parallel=parallel)
        if self.backend.needs_startup_check:
            from nanovllm.backends.self_check import startup_self_check

            startup_self_check(self.backend, [model.config.head_dim])
        self.worker = RankWorker(model, self.backend)

    def num_kv_blocks(self) -> int | None:
        return self.worker.num_kv_blocks(self.config)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.worker.allocate_kv_cache(num_blocks, block_size)

    def execute(self, inputs: StepInputs, block_size: int) -> np.ndarray | None:
        return self.worker.execute(inputs, block_size)


class RayRanks:
    """The Ranks of TensorParallelRunner as T actors on one node's GPUs."""

    def __init__(self, config: EngineConfig, size: int, max_positions: int) -> None:
        ray = ray_runtime.import_ray()
        ray_runtime.connect(None)  # a no-op inside a replica actor, which is connected
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.ray = ray
        group = placement_group([{"GPU": 1, "CPU": 1}] * size, strategy="STRICT_PACK")
        self._get(group.ready(), f"{size} GPUs on one node")
        actor = ray.remote(num_gpus=1, num_cpus=1)(RankActor)
        self.actors = [
            actor.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, bundle_index=rank)
            ).remote(config, rank, size, max_positions)
            for rank in range(size)
        ]
        unique_id = self._get(self.actors[0].unique_id.remote(), "rank 0's NCCL id")
        self._get([a.connect.remote(unique_id) for a in self.actors], "the NCCL group")
        self._get([a.load.remote() for a in self.actors], "every rank's weights")

    def num_kv_blocks(self, config: EngineConfig) -> int | None:
        counts = self._get([a.num_kv_blocks.remote() for a in self.actors], "memory sizes")
        return None if None in counts else min(counts)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self._get([a.allocate_kv_cache.remote(num_blocks, block_size) for a in self.actors], "KV caches")  # fmt: skip

    def execute(self, inputs: StepInputs, block_size: int) -> np.ndarray:
        shared = self.ray.put(inputs)  # serialized once for every rank
        return self.ray.get([a.execute.remote(shared, block_size) for a in self.actors])[0]

    def _get(self, refs: Any, what: str) -> Any:
        late = (
            f"tensor-parallel start-up: no {what} within {START_TIMEOUT_S:.0f} s (does the Ray "
            "cluster have enough GPUs on one node?)"
        )
        return ray_runtime.get_within(
            self.ray, refs, START_TIMEOUT_S, late, "a rank failed to start"
        )
