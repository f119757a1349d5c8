"""Rebuild a model's tokenizer from GGUF metadata (llama.cpp's `tokenizer.ggml.*` keys).

A GGUF stores the vocabulary, the merges and the special-token ids, but not the tokenizer.json
pipeline around them (normalizer, pre-tokenizer, post-processor). llama.cpp names that pipeline in
`tokenizer.ggml.pre`; for each name we support we rebuild the pipeline of the ORIGINAL model's
tokenizer.json, so that encodings equal the original model's.

Where this departs from transformers' own GGUF tokenizer (transformers 5.24), on purpose:
- `smollm`: SmolLM2's tokenizer.json splits every digit off before byte-level BPE
  (Sequence[Digits(individual_digits=True), ByteLevel]); llama.cpp's `smollm` regex does the
  same. transformers uses plain GPT-2 splitting, which differs where whitespace precedes a digit
  ("a  1" is [a, ĠĠ, 1] for the original, [a, Ġ, Ġ, 1] for transformers).
- `qwen2`: Qwen2/Qwen3's tokenizer.json normalizes text to NFC first; transformers and llama.cpp
  skip that, so they differ on decomposed accents ("e" + U+0301).
- `llama-bpe`: Llama 3's tokenizer.json sets BPE `ignore_merges` (a pre-token that is itself in
  the vocabulary is taken whole); llama.cpp does the same, transformers does not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from nanovllm.errors import ModelLoadError
from nanovllm.models.tokenizer import Tokenizer

# llama.cpp's token types (gguf.TokenType)
CONTROL = 3
USER_DEFINED = 4

_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The ids a model ends a turn with, by token text: llama.cpp treats these as end-of-generation
# whatever `eos_token_id` says (an instruct GGUF often names only one of them).
END_OF_GENERATION_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|eom_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
    }
)


def _gpt2_pre() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_pre() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _split_pre(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


class _Pipeline(NamedTuple):
    pre_tokenizer: Callable[[], pre_tokenizers.PreTokenizer]
    nfc: bool = False  # normalize text to NFC first
    ignore_merges: bool = False  # BPE takes a pre-token that is in the vocabulary whole
    add_bos: bool = False  # when the file has no tokenizer.ggml.add_bos_token


def _llama3() -> _Pipeline:
    return _Pipeline(lambda: _split_pre(_LLAMA3_SPLIT), ignore_merges=True, add_bos=True)


# tokenizer.ggml.pre -> the pipeline of the original model's tokenizer.json
_PIPELINES = {
    "default": _Pipeline(_gpt2_pre),
    "gpt-2": _Pipeline(_gpt2_pre),
    "smollm": _Pipeline(_digits_pre),
    "qwen2": _Pipeline(lambda: _split_pre(_QWEN2_SPLIT), nfc=True),
    "llama-bpe": _llama3(),
    "llama3": _llama3(),
    "llama-v3": _llama3(),
}
SUPPORTED_PRE_TOKENIZERS = tuple(_PIPELINES)


def build_tokenizer(meta: Mapping[str, Any]) -> Tokenizer:
    """The original model's tokenizer, rebuilt from a GGUF's metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(
            f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2', byte-level BPE; "
            "SentencePiece 'llama' vocabularies are not rebuilt yet)"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PIPELINES:
        raise ModelLoadError(
            f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(SUPPORTED_PRE_TOKENIZERS)}"
        )
    pipeline = _PIPELINES[pre]
    tokens = _required(meta, "tokenizer.ggml.tokens")
    merges = _required(meta, "tokenizer.ggml.merges")
    backend = tokenizers.Tokenizer(_bpe(tokens, merges, pipeline.ignore_merges))
    backend.normalizer = normalizers.NFC() if pipeline.nfc else None
    backend.pre_tokenizer = pipeline.pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    _add_special_tokens(backend, tokens, token_types(meta))
    bos, eos = token_text(meta, "bos"), token_text(meta, "eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", pipeline.add_bos))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    backend.post_processor = _post_processor(
        backend, bos if add_bos else None, eos if add_eos else None
    )
    return Tokenizer(
        backend, chat_template=meta.get("tokenizer.chat_template"), bos_token=bos, eos_token=eos
    )


def token_text(meta: Mapping[str, Any], which: str) -> str | None:
    """Text of the token `tokenizer.ggml.{which}_token_id` names, or None if the file names none."""
    token_id = meta.get(f"tokenizer.ggml.{which}_token_id")
    if token_id is None:
        return None
    tokens = meta["tokenizer.ggml.tokens"]
    if not 0 <= token_id < len(tokens):
        raise ModelLoadError(
            f"GGUF {which} token id {token_id} is outside the vocabulary of {len(tokens)} tokens"
        )
    return tokens[token_id]


def end_of_generation_ids(meta: Mapping[str, Any]) -> list[int]:
    """EOS first, then llama.cpp's other end-of-generation tokens (EOT, EOM, known turn-end texts)."""
    ids = [meta.get(f"tokenizer.ggml.{which}_token_id") for which in ("eos", "eot", "eom")]
    tokens = meta["tokenizer.ggml.tokens"]
    for token_id, (text, kind) in enumerate(zip(tokens, token_types(meta), strict=True)):
        if kind == CONTROL and text in END_OF_GENERATION_TEXTS:
            ids.append(token_id)
    return list(dict.fromkeys(i for i in ids if i is not None))


def token_types(meta: Mapping[str, Any]) -> list[int]:
    """llama.cpp's type of each token (1 normal, 3 control, 4 user-defined, ...); all normal if absent."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ModelLoadError(f"GGUF lists {len(types)} token types for {len(tokens)} tokens")
    return types


def _required(meta: Mapping[str, Any], key: str) -> Any:
    if key not in meta:
        raise ModelLoadError(f"GGUF metadata lacks {key}, which a byte-level BPE tokenizer needs")
    return meta[key]


def _bpe(tokens: list[str], merges: list[str], ignore_merges: bool) -> models.BPE:
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ")) for merge in merges]
    if any(len(pair) != 2 for pair in pairs):
        raise ModelLoadError("GGUF tokenizer.ggml.merges holds an entry that is not two tokens")
    return models.BPE(
        vocab, pairs, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges
    )


def _add_special_tokens(backend: tokenizers.Tokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens become special added tokens (skipped when decoding with skip_special_tokens);
    user-defined ones (like `<tool_call>`) plain added tokens: both are matched whole in the text."""
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, types, strict=True)
        if k == CONTROL
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, k in zip(tokens, types, strict=True)
        if k == USER_DEFINED
    ]
    backend.add_special_tokens(special)
    backend.add_tokens(user)


def _post_processor(
    backend: tokenizers.Tokenizer, bos: str | None, eos: str | None
) -> processors.PostProcessor | None:
    if bos is None and eos is None:
        return None
    ends = [t for t in (bos, eos) if t is not None]
    single = ([bos] if bos else []) + ["$A"] + ([eos] if eos else [])
    pair = single + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
    special = [(t, backend.token_to_id(t)) for t in dict.fromkeys(ends)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
