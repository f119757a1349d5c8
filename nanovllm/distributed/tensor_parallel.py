"""A tensor-parallel engine: one scheduler and sampler, the model split across T ranks.

The engine is the ordinary one (nanovllm/engine/assembly.py builds it) around a
`TensorParallelRunner`: it builds each step's flat batch, asks the proposer for guesses and
samples, exactly as ModelRunner does, but hands the forward to the ranks
(nanovllm/distributed/ranks.py), which return the logits.

Where the ranks live:
- `LocalRanks`: all in this process on the CPU or the emulated device, in lock step with the
  reference communicator (nanovllm/distributed/communicator.py). The test oracle.
- `RayRanks` (nanovllm/distributed/ray_ranks.py): one Ray actor per GPU with NCCL. The engine
  process then samples on the CPU from the logits rank 0 sends back.
"""

from __future__ import annotations

from nanovllm.backends import get_backend
from nanovllm.backends.base import Backend
from nanovllm.config import EngineConfig
from nanovllm.distributed.ranks import LocalRanks, Ranks
from nanovllm.engine.batch import ForwardItem, prepare
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.sampler import Sampler
from nanovllm.models.loader import Checkpoint
from nanovllm.models.model_config import ModelConfig
from nanovllm.models.sharding import check_tensor_parallel, local_config


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

    supports_prompt_logprobs = False  # the ranks return only the rows to sample

    def _eager(self, items: list[ForwardItem]):
        inputs = prepare(items, self.block_size)
        logits = self.backend.asarray(self.ranks.execute(inputs, self.block_size))
        self._guard(items, logits, logits)
        return logits, [[] for _ in items]


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
    return RayRanks(config, size, max_positions), get_backend("cpu", num_threads=config.num_threads)
