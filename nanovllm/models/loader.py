"""Resolve `--model` (Hub id, local folder or .gguf file) into a loaded model on a backend."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanovllm.backends import get_backend
from nanovllm.backends.base import AttentionInputs, AttentionMetadata, Backend
from nanovllm.demo import DEMO_MODELS, demo_model_path
from nanovllm.errors import ModelLoadError
from nanovllm.models import hub
from nanovllm.models.llama import LlamaForCausalLM
from nanovllm.models.model_config import ModelConfig
from nanovllm.models.registry import model_class
from nanovllm.models.safetensors_loader import (
    count_safetensors,
    iter_safetensors,
    safetensors_files,
)
from nanovllm.models.sharding import ParallelRank, local_config
from nanovllm.models.tokenizer import Tokenizer


@dataclass(slots=True)
class Checkpoint:
    config: ModelConfig
    tokenizer: Tokenizer
    generation_config: dict
    weights: Callable[[], Iterator[tuple[str, np.ndarray]]]
    num_weights: int | None = None  # how many tensors weights() yields, for a progress bar


def load_checkpoint(model: str, tokenizer: str | None = None) -> Checkpoint:
    if model in DEMO_MODELS:
        model = str(demo_model_path(model))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        checkpoint = _gguf_checkpoint(path, with_tokenizer=tokenizer is None)
    elif path.is_dir() and not (path / "config.json").exists() and list(path.glob("*.gguf")):
        checkpoint = _gguf_checkpoint(_only_gguf(path), with_tokenizer=tokenizer is None)
    elif path.is_dir():
        checkpoint = _folder_checkpoint(path)
    elif path.exists():
        raise ModelLoadError(
            f"{model} is a file but not a .gguf file; pass a model folder or a GGUF file"
        )
    elif _looks_like_path(model):
        raise ModelLoadError(f"model path {model} does not exist")
    else:
        checkpoint = _folder_checkpoint(hub.download(model))
    if tokenizer is not None:
        checkpoint.tokenizer = Tokenizer.from_folder(Path(tokenizer).expanduser())
    return checkpoint


def _only_gguf(folder: Path) -> Path:
    """The GGUF file of a folder that holds one (and no config.json)."""
    files = sorted(folder.glob("*.gguf"))
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise ModelLoadError(
            f"{folder} holds several GGUF files ({names}); pass the one to load as --model"
        )
    return files[0]


def check_model_exists(model: str) -> None:
    """Fail at once on a local path that does not exist (nothing is read)."""
    if model not in DEMO_MODELS and _looks_like_path(model) and not Path(model).expanduser().exists():  # fmt: skip
        raise ModelLoadError(f"model path {model} does not exist")


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or model.endswith(".gguf") or model.count("/") > 1


def _folder_checkpoint(folder: Path) -> Checkpoint:
    config_file = folder / "config.json"
    if not config_file.exists():
        raise ModelLoadError(
            f"{folder} has no config.json and no .gguf file: pass a Hugging Face model folder "
            "(config.json, *.safetensors, tokenizer.json), a .gguf file, or a folder holding one"
        )
    config = ModelConfig.from_hf(_read_json(config_file))
    model_class(config.architecture)  # refuse unknown architectures before reading weights
    generation_config = _read_json(folder / "generation_config.json", default={})
    if not config.eos_token_ids and "eos_token_id" in generation_config:
        config.eos_token_ids = _ids(generation_config["eos_token_id"])
    files = safetensors_files(folder)
    return Checkpoint(
        config=config,
        tokenizer=Tokenizer.from_folder(folder),
        generation_config=generation_config,
        weights=lambda: iter_safetensors(files),
        num_weights=count_safetensors(files),
    )


def _gguf_checkpoint(path: Path, with_tokenizer: bool = True) -> Checkpoint:
    from nanovllm.models.gguf_loader import load_gguf

    # With --tokenizer the file's own vocabulary is not rebuilt: a GGUF whose tokenizer we cannot
    # rebuild (SentencePiece) still loads next to the original tokenizer.json.
    gguf = load_gguf(path, with_tokenizer)
    model_class(gguf.config.architecture)
    return Checkpoint(
        gguf.config, gguf.tokenizer, gguf.generation_config, gguf.weights, gguf.num_weights
    )


def _read_json(path: Path, default: dict | None = None) -> dict:
    if not path.exists() and default is not None:
        return default
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None


def _ids(value) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def build_model(
    checkpoint: Checkpoint,
    backend: Backend,
    max_positions: int,
    progress=None,
    parallel: ParallelRank | None = None,
) -> LlamaForCausalLM:
    """The checkpoint's model on `backend` (with `parallel`, one tensor-parallel rank's share);
    `progress(weights, total)` may wrap the tensors' iterator."""
    config = checkpoint.config
    if parallel is not None:
        config = local_config(config, parallel.size)
    model = model_class(config.architecture)(config, backend, max_positions)
    model.parallel = parallel
    weights = checkpoint.weights()
    if progress is not None:
        weights = progress(weights, checkpoint.num_weights)
    model.load_weights(weights)
    return model


class LoadedModel:
    """A model with its tokenizer, and the single-sequence path used to prove parity with
    transformers independently of the scheduler: one sequence in contiguous KV blocks."""

    def __init__(
        self, checkpoint: Checkpoint, backend: Backend, max_positions: int, model=None
    ) -> None:
        """model: one already built from this checkpoint on this backend (else built here)."""
        self.config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.generation_config = checkpoint.generation_config
        self.backend = backend
        self.max_positions = max_positions
        self.model = model or build_model(checkpoint, backend, max_positions)

    def logits(
        self, token_ids: list[int], inspect=None, chunks: list[int] | None = None
    ) -> np.ndarray:
        """[T, vocab] float32 logits at every position of one sequence. inspect: see
        LlamaForCausalLM.forward. chunks: token counts of successive forwards (chunked
        prefill; default one forward of everything)."""
        caches = self._new_caches(len(token_ids))
        out, start = [], 0
        for size in chunks or [len(token_ids)]:
            hidden = self._forward(token_ids[start : start + size], start, caches, inspect)
            out.append(self.backend.to_numpy(self.model.compute_logits(hidden)))
            start += size
        return np.concatenate(out).astype(np.float32)

    def greedy(self, token_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation (no EOS stop): prefill once, then one decode step per token."""
        caches = self._new_caches(len(token_ids) + max_new_tokens)
        hidden = self._forward(list(token_ids), 0, caches)
        out: list[int] = []
        while len(out) < max_new_tokens:
            logits = self.backend.to_numpy(self.model.compute_logits(hidden[-1:]))
            out.append(int(np.argmax(logits[0])))
            hidden = self._forward(out[-1:], len(token_ids) + len(out) - 1, caches)
        return out

    _BLOCK = 16

    def _new_caches(self, num_tokens: int):
        if num_tokens > self.max_positions:
            raise ValueError(f"{num_tokens} tokens exceed the maximum length {self.max_positions}")
        cfg, blocks = self.config, -(-num_tokens // self._BLOCK)
        shape = (blocks, self._BLOCK, cfg.num_kv_heads, cfg.head_dim)
        return [
            (self.backend.zeros(shape), self.backend.zeros(shape)) for _ in range(cfg.num_layers)
        ]

    def _forward(self, token_ids: list[int], start: int, caches, inspect=None):
        end = start + len(token_ids)
        blocks = np.arange(caches[0][0].shape[0], dtype=np.int32)[None, :]
        # One sequence whose block i is cache block i: slot = position.
        host = AttentionInputs.from_lists(np.arange(start, end), blocks, [0, end - start], [end])
        meta = AttentionMetadata.build(host, self._BLOCK, host.map(self.backend.asarray))
        ids = self.backend.asarray(np.asarray(token_ids, dtype=np.int64))
        positions = self.backend.asarray(np.arange(start, end, dtype=np.int64))
        if inspect is None:
            return self.model.forward(ids, positions, meta, caches)
        return self.model.forward(ids, positions, meta, caches, inspect=inspect)


def load_model(
    model: str,
    device: str = "cpu",
    dtype: str = "auto",
    max_model_len: int | None = None,
    num_threads: int | None = None,
    quantization: str = "auto",
) -> LoadedModel:
    checkpoint = load_checkpoint(model)
    max_positions = max_model_len or checkpoint.config.max_position_embeddings
    backend = get_backend(device, dtype, num_threads, quantization)
    return LoadedModel(checkpoint, backend, max_positions)
