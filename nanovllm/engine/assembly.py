"""Building an engine: checkpoint(s), backend, models, KV cache, and the parts of the step.

`build_engine(config)` does everything a front end needs; `assemble(...)` wires already-built
parts, so benchmarks and tests can hand it their own model (a null model that costs nothing,
a fake that records what it is asked) without patching anything afterwards.

What happens at start-up, in order: the checkpoint (and a draft model's) is read; the backend is
chosen and refuses, before any weight is loaded, a model whose head_dim or dtype it has no
kernel for; the weights are loaded (their memory is logged); the backend's start-up check runs
for every head_dim, matmul path and weight format in use, with one step of each model against
the reference; the KV cache is sized for the target and the draft together; the parts are
built.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from nanovllm.backends import get_backend
from nanovllm.backends.base import Backend
from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.llm_engine import LLMEngine, ModelInfo
from nanovllm.engine.model_runner import ModelRunner, allocate_kv_cache
from nanovllm.engine.output_processor import OutputProcessor
from nanovllm.engine.sampler import Sampler
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.spec_decode import DraftProposer, NgramProposer
from nanovllm.errors import NanovllmError
from nanovllm.models.loader import Checkpoint, build_model, check_model_exists, load_checkpoint
from nanovllm.models.model_config import ModelConfig

DEFAULT_NUM_BLOCKS = 512  # `--num-blocks auto` without device memory to size from
logger = logging.getLogger("nanovllm.engine")


@dataclass(slots=True)
class Models:
    target: object  # a model: config, forward(...), compute_logits(...)
    draft: object | None = None


def build_engine(config: EngineConfig) -> LLMEngine:
    """Each phase logs its duration at INFO (`nanovllm serve` and `generate` show them)."""
    start = time.perf_counter()
    # First what fails without reading anything: a missing path, a device or dtype the
    # backend cannot serve.
    for model in (config.model, config.draft_model):
        if model is not None:
            check_model_exists(model)
    backend = get_backend(config.device, config.dtype, config.num_threads, config.quantization)
    logger.info("set up the %s backend in %.1f s", backend.name, time.perf_counter() - start)
    with phase(f"reading {config.model} (config, tokenizer)", f"read {config.model}"):
        checkpoint = load_checkpoint(config.model, config.tokenizer)
        wants_draft = config.speculative_method == "draft"
        draft = load_checkpoint(config.draft_model) if wants_draft else None
    if draft is not None:
        _check_draft_vocabulary(config, checkpoint.config, draft.config)
    configs = [checkpoint.config] + ([draft.config] if draft is not None else [])
    for model_config in configs:
        backend.check_model(model_config)  # before loading: refuse what it has no kernel for
    limit = length_limit(config, checkpoint.config)
    if config.tensor_parallel_size > 1:
        return _sharded_engine(config, checkpoint, backend, limit)
    with phase("loading the weights", "loaded the weights"):
        models = Models(
            build_model(checkpoint, backend, limit, weight_progress),
            build_model(draft, backend, limit, weight_progress) if draft is not None else None,
        )
    _report_weights(backend, models)
    if backend.needs_startup_check:
        _self_check(config, backend, models, checkpoint, draft)
    engine = assemble(config, model_info(checkpoint, limit), backend, models)
    logger.info(
        "engine ready in %.1f s: %s on %s, KV cache of %d blocks x %d tokens, max_model_len %d",
        time.perf_counter() - start, checkpoint.config.architecture, backend.name,
        engine.block_manager.num_blocks, config.block_size, engine.max_model_len,
    )  # fmt: skip
    return engine


def _self_check(
    config: EngineConfig,
    backend: Backend,
    models: Models,
    checkpoint: Checkpoint,
    draft: Checkpoint | None,
) -> None:
    """The device's kernels and one step of each loaded model against the reference."""
    from nanovllm.backends.self_check import LoadedForCheck, startup_self_check

    loaded = [LoadedForCheck(models.target, checkpoint, config.model)]
    if draft is not None:
        loaded.append(LoadedForCheck(models.draft, draft, config.draft_model))
    head_dims = sorted({m.checkpoint.config.head_dim for m in loaded})
    with phase("checking the kernels and the model on the device", "start-up self-check"):
        startup_self_check(backend, head_dims, loaded)


@contextmanager
def phase(doing: str, done: str) -> Iterator[None]:
    """Log what starts, then what was done with its duration (a phase may take seconds)."""
    start = time.perf_counter()
    logger.info("%s ...", doing)
    yield
    logger.info("%s in %.1f s", done, time.perf_counter() - start)


def weight_progress(weights: Iterator, total: int | None) -> Iterator:
    """A progress bar over the checkpoint's tensors, on a terminal that shows INFO logs."""
    if not (logger.isEnabledFor(logging.INFO) and sys.stderr.isatty()):
        return weights
    try:
        from tqdm import tqdm
    except ImportError:
        return weights
    return tqdm(weights, total=total, desc="Loading weights", unit="tensor", leave=False)


def assemble(config: EngineConfig, info: ModelInfo, backend: Backend, models: Models) -> LLMEngine:
    """An engine from loaded models. info.max_model_len is the model's limit before the KV
    cache's capacity caps it."""
    configs = [models.target.config] + ([models.draft.config] if models.draft else [])
    loaded = [models.target] + ([models.draft] if models.draft else [])
    num_blocks = num_kv_blocks(config, backend, configs, loaded)
    window = attention_window(configs)
    fit_window = 0 if models.draft else window  # a draft catches up on whole prompts at once
    info.max_model_len = _fit_length(config, info.max_model_len, num_blocks, fit_window)
    eos = info.eos_token_ids
    k = num_speculative_slots(config)
    runner = ModelRunner(
        models.target,
        backend,
        allocate_kv_cache(backend, models.target.config, num_blocks, config.block_size),
        config.block_size,
        Sampler(config.seed, backend),
        eos,
        _proposer(config, backend, models.draft, num_blocks, eos),
        k,
    )
    if backend.supports_decode_graphs and not config.enforce_eager:
        runner.enable_decode_graphs(config.max_num_seqs, info.max_model_len)
    return _engine_around(config, info, runner, num_blocks, window)


def _sharded_engine(
    config: EngineConfig, checkpoint: Checkpoint, backend: Backend, limit: int
) -> LLMEngine:
    """The engine with its model split over tensor-parallel ranks: the ranks hold the weights
    and the KV cache (nanovllm/distributed/tensor_parallel.py); the rest is the usual engine."""
    from nanovllm.distributed.tensor_parallel import TensorParallelRunner, start_ranks

    ranks, backend = start_ranks(config, checkpoint, backend, limit)
    num_blocks = config.num_blocks
    if num_blocks == "auto":
        num_blocks = ranks.num_kv_blocks(config) or DEFAULT_NUM_BLOCKS
    ranks.allocate_kv_cache(num_blocks, config.block_size)
    window = attention_window([checkpoint.config])
    info = model_info(checkpoint, _fit_length(config, limit, num_blocks, window))
    runner = TensorParallelRunner(
        ranks, checkpoint.config, backend, config.block_size, Sampler(config.seed, backend),
        info.eos_token_ids, ngram_proposer(config), num_speculative_slots(config),
    )  # fmt: skip
    return _engine_around(config, info, runner, num_blocks, window)


def _engine_around(
    config: EngineConfig, info: ModelInfo, runner: ModelRunner, num_blocks: int, window: int
) -> LLMEngine:
    """The engine's policy and bookkeeping parts around a ready runner and its KV cache."""
    manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
    k = num_speculative_slots(config)
    scheduler = Scheduler(config, manager, k, info.max_model_len, window)
    processor = OutputProcessor(info.tokenizer, info.eos_token_ids, info.max_model_len)
    return LLMEngine(config, info, scheduler, runner, processor)


def _report_weights(backend: Backend, models: Models) -> None:
    from nanovllm.backends.memory import weight_memory

    where = "device" if backend.name.startswith("cuda") else "host"
    for role, model in (("model", models.target), ("draft model", models.draft)):
        if model is not None:
            memory = weight_memory(model)
            logger.info("%s weights: %s in %s memory", role, memory.describe(), where)


def num_speculative_slots(config: EngineConfig) -> int:
    return config.num_speculative_tokens if config.speculative_method else 0


def model_info(checkpoint: Checkpoint, max_model_len: int) -> ModelInfo:
    return ModelInfo(
        model_config=checkpoint.config,
        tokenizer=checkpoint.tokenizer,
        generation_config=checkpoint.generation_config,
        eos_token_ids=eos_token_ids(checkpoint),
        max_model_len=max_model_len,
    )


def eos_token_ids(checkpoint: Checkpoint) -> list[int]:
    """Every id that ends generation: the config's, generation_config's and the tokenizer's."""
    ids = list(checkpoint.config.eos_token_ids)
    gen_eos = checkpoint.generation_config.get("eos_token_id")
    ids += gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos]
    if checkpoint.tokenizer.eos_token_id is not None:
        ids.append(checkpoint.tokenizer.eos_token_id)
    return sorted({int(i) for i in ids})


def length_limit(config: EngineConfig, model_config: ModelConfig) -> int:
    """max_model_len before the KV capacity caps it (so a lone sequence always fits)."""
    limit = model_config.max_position_embeddings
    if config.max_model_len is not None and config.max_model_len > limit:
        raise NanovllmError(
            f"max_model_len {config.max_model_len} exceeds the model's maximum length {limit}"
        )
    return config.max_model_len or limit


def attention_window(configs: list[ModelConfig]) -> int:
    """The widest window when every layer of every model (target and draft share block tables)
    attends through one; 0 when any layer attends to everything."""
    windows = [c.window(layer) for c in configs for layer in range(c.num_layers)]
    return max(windows) if windows and min(windows) > 0 else 0


def _fit_length(config: EngineConfig, limit: int, num_blocks: int, window: int = 0) -> int:
    capacity = num_blocks * config.block_size
    # A windowed sequence holds its window, one step's tokens and a block kept for the prefix
    # cache, however long it grows: with that much room, the model's own limit stands.
    if window and capacity >= window + config.max_num_batched_tokens + 2 * config.block_size:
        return limit
    if config.max_model_len is not None and config.max_model_len > capacity:
        raise NanovllmError(
            f"max_model_len {config.max_model_len} exceeds the KV cache capacity of {capacity} "
            f"tokens (num_blocks {num_blocks} x block_size {config.block_size}); "
            f"raise --num-blocks or lower --max-model-len"
        )
    # Without an explicit max_model_len, a lone sequence must still fit in the cache.
    return min(limit, capacity)


def num_kv_blocks(
    config: EngineConfig, backend: Backend, configs: list[ModelConfig], models: list | None = None
) -> int:
    """`--num-blocks auto` sizes the KV cache from free device memory once the weights are
    loaded, for the target and the draft model together (they share block tables), keeping out
    a reserve for what steps allocate (nanovllm/backends/memory.py); a backend without device
    memory to size from gets the default. `models`: the loaded models, whose GGUF weights
    decide the dequantize scratch."""
    if config.num_blocks != "auto":
        return config.num_blocks
    memory = backend.memory_info()
    if memory is None:
        return DEFAULT_NUM_BLOCKS
    from nanovllm.backends.cuda import DEQUANTIZE_SCRATCH_BYTES
    from nanovllm.backends.memory import dequantize_scratch_bytes, kv_blocks_for_memory

    graphs = getattr(backend, "captures_graphs", False) and not config.enforce_eager
    scratch = dequantize_scratch_bytes(models or [], backend.dtype, DEQUANTIZE_SCRATCH_BYTES)
    blocks, reserve = kv_blocks_for_memory(
        config, configs, backend.dtype, *memory, graphs=graphs, scratch_bytes=scratch
    )
    free, total = memory
    logger.info(
        "KV cache: %d blocks of %d tokens; %.2f GiB of %.2f GiB in use, %.2f GiB reserved (%s)",
        blocks, config.block_size, (total - free) / 2**30, total / 2**30, reserve.total / 2**30,
        reserve.describe(),
    )  # fmt: skip
    return blocks


def _proposer(config: EngineConfig, backend: Backend, draft, num_blocks: int, eos: list[int]):
    if config.speculative_method != "draft":
        return ngram_proposer(config)
    kv = allocate_kv_cache(backend, draft.config, num_blocks, config.block_size)
    runner = ModelRunner(draft, backend, kv, config.block_size, Sampler(config.seed + 1, backend), eos)  # fmt: skip
    return DraftProposer(runner, eos)


def ngram_proposer(config: EngineConfig) -> NgramProposer | None:
    if config.speculative_method != "ngram":
        return None
    return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)


def _check_draft_vocabulary(config: EngineConfig, target: ModelConfig, draft: ModelConfig) -> None:
    if draft.vocab_size != target.vocab_size:
        raise NanovllmError(
            f"draft model {config.draft_model} has a vocabulary of {draft.vocab_size} tokens but "
            f"the target has {target.vocab_size}; speculative decoding needs a draft that shares "
            f"the target's vocabulary"
        )
