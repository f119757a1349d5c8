"""The seam through which a sequence restricts the tokens it may take (structured outputs).

A sequence may carry a TokenConstraint. Each step the model runner asks it for the allowed
tokens of every logits row the sequence samples or verifies, as one bitmask row each, and masks
the logits where they live (the backend's `apply_token_bitmask`: -inf where a bit is 0) before
sampling, so constrained and free rows share one batch. The output processor reports every
token the sequence commits, so the constraint's state follows the sequence's tokens through
preemption (which keeps the tokens) and speculation (only accepted tokens are committed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class TokenConstraint(Protocol):
    def fill_bitmask(self, proposed: Sequence[int], out: np.ndarray) -> None:
        """out: int32 [len(proposed) + 1, bitmask_words(vocab)]. Row i: the tokens allowed after
        the committed tokens plus proposed[:i] (speculative guesses). Bit b of word w allows
        token 32 * w + b (llguidance's layout). Rows after a proposed token the constraint
        refuses may hold anything: verification rejects there. Leaves the state as it found it."""

    def accept(self, token_id: int) -> bool:
        """The sequence committed token_id; advance. False if it was not allowed."""

    @property
    def is_finished(self) -> bool:
        """No token may follow: the sequence ends (finish_reason "stop")."""


def bitmask_words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


class AllowedTokens:
    """The simplest constraint: a fixed set of tokens at every position (vLLM's
    allowed_token_ids); it never finishes a sequence."""

    def __init__(self, token_ids: Sequence[int], vocab_size: int) -> None:
        allowed = np.zeros(bitmask_words(vocab_size) * 32, dtype=bool)
        allowed[list(token_ids)] = True
        self.row = np.packbits(allowed, bitorder="little").view(np.int32)

    def fill_bitmask(self, proposed: Sequence[int], out: np.ndarray) -> None:
        out[:] = self.row

    def accept(self, token_id: int) -> bool:
        return bool(self.row.view(np.uint32)[token_id // 32] >> np.uint32(token_id % 32) & 1)

    @property
    def is_finished(self) -> bool:
        return False
