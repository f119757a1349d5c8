"""Real tokenizers for the structured-output tests, as the engine gets them from the demo GGUFs,
and a greedy walk through a grammar that checks every mask against llguidance's own matcher.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import llguidance
import numpy as np

from nanovllm.demo import cache_dir, demo_model_path
from nanovllm.models import gguf_tokenizer
from nanovllm.models.tokenizer import Tokenizer
from nanovllm.structured.bitmask import allocate_bitmask, allowed_tokens, apply_token_bitmask
from nanovllm.structured.params import StructuredOutputsParams


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


class Walk:
    """Greedy decoding under random logits, the mask checked against an oracle matcher each step.

    Closing tokens (quotes, brackets, commas, EOS) get a bonus and blank tokens a malus on most
    steps, so that strings, arrays and numbers end soon even where the grammar allows any
    whitespace; everything else is random."""

    def __init__(self, name: str, params: StructuredOutputsParams, seed: int = 0) -> None:
        self.model = MODELS[name]()
        self.compiled = compiler(name).compile(params)
        self.constraint = self.compiled.constraint()
        self.oracle = llguidance.LLMatcher(compiler(name).ll_tokenizer, self.compiled.text)
        self.rng = np.random.default_rng(seed)
        tok = self.model.tokenizer
        closers = ['"', "}", "]", ",", '"}', "}]", '"]', '",']
        self.favoured = [i for i in (tok.token_to_id(t) for t in closers) if i is not None]
        self.blank = blank_tokens(name)
        self.ids: list[int] = []
        self.eos_allowed: list[bool] = []  # at each step

    def run(self, max_steps: int = 400, check: Callable[[str, bool], None] | None = None):
        mask = allocate_bitmask(1, self.model.vocab_size)
        eos = set(self.model.eos_token_ids)
        for _ in range(max_steps):
            self.constraint.fill_bitmask([], mask)
            assert_same_mask(mask[0], self.oracle)
            eos_allowed = bool(allowed_tokens(mask[0], self.model.vocab_size)[min(eos)])
            if check is not None:
                check(self.text, eos_allowed)
            token = self._pick(mask)
            assert self.constraint.accept(token)
            if token in eos:
                return True
            assert self.oracle.consume_token(token)
            self.ids.append(token)
        return False

    @property
    def text(self) -> str:
        return self.model.tokenizer.decode(self.ids)

    def _pick(self, mask: np.ndarray) -> int:
        logits = self.rng.standard_normal((1, self.model.vocab_size)).astype(np.float32)
        if self.rng.random() < 0.7 or len(self.ids) > 150:
            logits[0, self.favoured] += 30.0
            logits[0, list(self.model.eos_token_ids)] += 60.0
            logits[0, self.blank] -= 30.0
        apply_token_bitmask(logits, mask)
        return int(logits[0].argmax())


@functools.cache
def blank_tokens(name: str) -> np.ndarray:
    return np.array([t for t, text in enumerate(token_texts(name)) if text and not text.strip()])


def oracle_mask(matcher: llguidance.LLMatcher) -> np.ndarray:
    """The matcher's own mask (its buffer may carry a spare word past the vocabulary)."""
    return np.frombuffer(matcher.compute_bitmask(), dtype=np.int32)


def assert_same_mask(row: np.ndarray, matcher: llguidance.LLMatcher) -> None:
    expected = oracle_mask(matcher)
    assert not expected[len(row) :].any()
    assert np.array_equal(row, expected[: len(row)]), "mask differs from llguidance's matcher"


@functools.cache
def token_texts(name: str) -> list[str | None]:
    """Each token's text alone; None for special tokens, partial UTF-8, ids past the tokenizer."""
    model = MODELS[name]()
    tok = model.tokenizer
    texts: list[str | None] = []
    for token in range(model.vocab_size):
        text = None
        if token < tok.vocab_size and token not in tok.all_special_ids:
            text = tok.decode([token], skip_special_tokens=False)
            text = None if "\ufffd" in text or not text else text
        texts.append(text)
    return texts
