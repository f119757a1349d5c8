"""allowed_token_ids and bad_words as vLLM defines them: TokenConstraints, so they reach the logits
through the same bitmask rows as a grammar and combine with one (`AllOf`). (logit_bias is added
by the sampler: nanovllm/engine/logits_processors.py.)

- allowed_token_ids: only these tokens, at every step (EOS too only if listed).
- bad_words: each word is tokenized as vLLM does (as written and with a leading space); a
  one-token word is never allowed, and the last token of a longer one is forbidden wherever the
  output so far (plus the speculative drafts before the row) ends with the word's other tokens.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from nanovllm.models.tokenizer import Tokenizer
from nanovllm.structured.bitmask import ALL_ALLOWED, bitmask_from_token_ids, clear_tokens

if TYPE_CHECKING:
    from nanovllm.engine.constraints import TokenConstraint


class AllowedTokens:
    """A constraint that allows the same set of tokens at every step."""

    def __init__(self, token_ids: Sequence[int], vocab_size: int) -> None:
        self.row = bitmask_from_token_ids(token_ids, vocab_size)

    def fill_bitmask(self, proposed: Sequence[int], out: np.ndarray) -> None:
        out[: len(proposed) + 1] = self.row

    def accept(self, token_id: int) -> bool:
        word, bit = divmod(token_id, 32)
        return word < len(self.row) and bool((int(self.row[word]) >> bit) & 1)

    @property
    def is_finished(self) -> bool:
        return False


class BadWords:
    """A constraint that forbids the token completing any bad word."""

    def __init__(self, words: Sequence[Sequence[int]], output_token_ids: Sequence[int]) -> None:
        self.words = [tuple(w) for w in words if w]
        longest = max((len(w) for w in self.words), default=1)
        self.tail: deque[int] = deque(output_token_ids[-(longest - 1) :] if longest > 1 else [],
                                      maxlen=longest - 1)  # fmt: skip

    def fill_bitmask(self, proposed: Sequence[int], out: np.ndarray) -> None:
        history = list(self.tail)
        for i in range(len(proposed) + 1):
            out[i] = ALL_ALLOWED
            clear_tokens(out[i], self.banned(history + list(proposed[:i])))

    def banned(self, history: Sequence[int]) -> list[int]:
        """The tokens that would complete a bad word after `history`."""
        banned = []
        for word in self.words:
            prefix = word[:-1]
            if not prefix or tuple(history[len(history) - len(prefix) :]) == prefix:
                banned.append(word[-1])
        return banned

    def accept(self, token_id: int) -> bool:
        allowed = token_id not in self.banned(list(self.tail))
        if self.tail.maxlen:
            self.tail.append(token_id)
        return allowed

    @property
    def is_finished(self) -> bool:
        return False


class AllOf:
    """Several constraints on one sequence: a token is allowed where all of them allow it."""

    def __init__(self, constraints: Sequence[TokenConstraint]) -> None:
        self.constraints = list(constraints)

    def fill_bitmask(self, proposed: Sequence[int], out: np.ndarray) -> None:
        rows = len(proposed) + 1
        first, *rest = self.constraints
        first.fill_bitmask(proposed, out)
        scratch = np.empty((rows, out.shape[1]), dtype=np.int32)
        for constraint in rest:
            constraint.fill_bitmask(proposed, scratch)
            np.bitwise_and(out[:rows], scratch, out=out[:rows])

    def accept(self, token_id: int) -> bool:
        results = [constraint.accept(token_id) for constraint in self.constraints]
        return all(results)

    @property
    def is_finished(self) -> bool:
        return any(constraint.is_finished for constraint in self.constraints)


def combine(constraints: Sequence[TokenConstraint | None]) -> TokenConstraint | None:
    """None, the one constraint given, or AllOf them."""
    present = [c for c in constraints if c is not None]
    if len(present) <= 1:
        return present[0] if present else None
    return AllOf(present)


def tokenize_bad_words(bad_words: Sequence[str], tokenizer: Tokenizer) -> list[list[int]]:
    """Each bad word's token ids as vLLM derives them: the word (leading spaces stripped), and with
    one leading space when that tokenizes to another first token but as many tokens."""
    out: list[list[int]] = []
    for word in bad_words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if not plain:
            raise ValueError(f"bad_words entry {word!r} tokenizes to no tokens")
        out.append(plain)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    return out
