"""The seam through which a sequence restricts the tokens it may take (structured outputs).

A sequence may carry a TokenConstraint. Each step the model runner asks it for the allowed
tokens of every logits row the sequence samples or verifies, as one bitmask row each, and masks
the logits where they live (the backend's `apply_token_bitmask`: -inf where a bit is 0) before
sampling, so constrained and free rows share one batch. The output processor reports every
token the sequence commits, so the constraint's state follows the sequence's tokens through
preemption (which keeps the tokens) and speculation (only accepted tokens are committed).

The implementations live in nanovllm/structured: a grammar (`GrammarConstraint`),
allowed_token_ids (`AllowedTokens`), bad_words (`BadWords`), several at once (`AllOf`), and a
grammar that waits for the reasoning to end (`ReasoningGate`). nanovllm/engine/
structured_outputs.py builds them from a request's SamplingParams.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class TokenConstraint(Protocol):
    def fill_bitmask(self, proposed: Sequence[int], out: np.ndarray) -> None:
        """out: int32 [len(proposed) + 1, ceil(vocab_size / 32)]. Row i: the tokens allowed
        after the committed tokens plus proposed[:i] (speculative guesses). Bit b of word w
        allows token 32 * w + b (llguidance's layout). Rows after a proposed token the
        constraint refuses may hold anything: verification rejects there. Leaves the state as
        it found it."""

    def accept(self, token_id: int) -> bool:
        """The sequence committed token_id; advance. False if it was not allowed."""

    @property
    def is_finished(self) -> bool:
        """No token may follow: the sequence ends (finish_reason "stop")."""
