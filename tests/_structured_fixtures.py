"""Real tokenizers for the structured-output tests, as the engine gets them from the demo GGUFs.

Rebuilding a tokenizer from a GGUF's metadata takes ~5 s (SmolLM2) to ~30 s (Qwen2.5: the
`gguf` reader walks 150k strings), so the result of our own loader is cached as a tokenizer
folder, keyed by the loader's source and the file, next to the demo models.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nanovllm.demo import cache_dir, demo_model_path
from nanovllm.models import gguf_tokenizer
from nanovllm.models.tokenizer import Tokenizer


@dataclass(frozen=True)
class ModelTokenizer:
    """A model's tokenizer with what structured outputs need besides it."""

    name: str
    tokenizer: Tokenizer
    vocab_size: int  # the model's logits, may exceed the tokenizer's vocabulary
    eos_token_ids: tuple[int, ...]


@functools.cache
def demo_tokenizer(demo: str) -> ModelTokenizer:
    """The tokenizer nanovllm's GGUF loader builds for a demo model (smollm2-demo,
    qwen2.5-coder-demo), cached as a folder."""
    gguf = demo_model_path(demo)
    source = inspect.getsource(gguf_tokenizer).encode()
    key = hashlib.sha256(source + str(gguf.stat().st_size).encode()).hexdigest()[:12]
    folder = cache_dir() / f"{demo}-tokenizer-{key}"
    if not (folder / "model.json").is_file():
        _build(gguf, folder)
    model = json.loads((folder / "model.json").read_text())
    return ModelTokenizer(
        demo, Tokenizer.from_folder(folder), model["vocab_size"], tuple(model["eos_token_ids"])
    )


@functools.cache
def qwen3_tokenizer() -> ModelTokenizer:
    """Qwen3's own tokenizer.json (151669 tokens) under Qwen3's 151936 logits; has <think>."""
    from _text_fixtures import qwen3_folder

    tokenizer = Tokenizer.from_folder(qwen3_folder())
    return ModelTokenizer("qwen3", tokenizer, 151936, (151645, 151643))


MODELS = {
    "smollm2": lambda: demo_tokenizer("smollm2-demo"),
    "qwen2.5": lambda: demo_tokenizer("qwen2.5-coder-demo"),
    "qwen3": qwen3_tokenizer,
}


@functools.cache
def compiler(name: str):
    """One GrammarCompiler per model tokenizer for the whole session (llguidance's tokenizer
    takes 0.3-2 s to build)."""
    from nanovllm.structured.compiler import GrammarCompiler

    model = MODELS[name]()
    return GrammarCompiler(model.tokenizer, model.vocab_size, model.eos_token_ids)


def _build(gguf: Path, folder: Path) -> None:
    from nanovllm.models.gguf_loader import load_gguf

    checkpoint = load_gguf(gguf)
    tok = checkpoint.tokenizer
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        tok.backend.save(str(out / "tokenizer.json"))
        config = {"bos_token": tok.bos_token, "eos_token": tok.eos_token}
        if tok.chat_template:
            config["chat_template"] = tok.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(config))
        model = {
            "vocab_size": checkpoint.config.vocab_size,
            "eos_token_ids": list(checkpoint.config.eos_token_ids),
        }
        (out / "model.json").write_text(json.dumps(model))
        try:
            os.replace(out, folder)  # atomic: a concurrent run sees all of it or nothing
        except OSError:
            if not (folder / "model.json").is_file():
                raise
