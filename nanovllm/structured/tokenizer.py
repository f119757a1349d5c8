"""llguidance's view of a model's tokenizer, built once per (tokenizer, vocabulary, EOS ids).

llguidance reads the same `tokenizers` JSON our Tokenizer wraps (no transformers needed) and
precomputes a token trie over it, which takes 0.3-2 s for a 50k-150k vocabulary: hence the
cache. Masks are as wide as the model's vocabulary, which may exceed the tokenizer's (Qwen2.5
and Qwen3 have 151936 logits for 151665-151669 tokens): the extra ids are never allowed.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence

import llguidance

from nanovllm.models.tokenizer import Tokenizer

_cache: weakref.WeakKeyDictionary[Tokenizer, dict[tuple, llguidance.LLTokenizer]] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()


def ll_tokenizer(
    tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int] = ()
) -> llguidance.LLTokenizer:
    """The llguidance tokenizer for a model: masks `vocab_size` wide (the model's logits, or
    the tokenizer's vocabulary if that is larger), EOS allowed where the grammar may end."""
    eos = tuple(eos_token_ids)
    if not eos and tokenizer.eos_token_id is not None:
        eos = (tokenizer.eos_token_id,)
    if not eos:
        raise ValueError("structured outputs need an end-of-sequence token id; the model has none")
    n_vocab = max(vocab_size, tokenizer.vocab_size)
    key = (n_vocab, eos)
    with _lock:
        built = _cache.setdefault(tokenizer, {})
        if key not in built:
            built[key] = llguidance.LLTokenizer(
                tokenizer.backend.to_str(), n_vocab=n_vocab, eos_token=list(eos)
            )
        return built[key]
