"""GrammarConstraint: a TokenConstraint (nanovllm/engine/constraints.py) backed by an llguidance matcher.

The model runner asks a sequence's constraint for a bitmask row for every logits row it samples
or verifies (the next token, and under speculative decoding one row after each draft token);
the output processor reports every token the sequence commits. `fill_bitmasks` does a whole
step's grammar rows at once on llguidance's thread pool.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np

from nanovllm.engine.constraints import TokenConstraint
from nanovllm.structured.bitmask import ALL_ALLOWED, bitmask_words
from nanovllm.structured.reasoning import ReasoningGate


class GrammarConstraint:
    """A grammar's state for one sequence. EOS is allowed exactly where the grammar accepts; once
    the grammar can take nothing more it allows only EOS and `is_finished` is true."""

    def __init__(
        self,
        matcher: llguidance.LLMatcher,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        matcher_vocab_size: int | None = None,
    ) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size  # the model's: the width of the rows asked for
        self.eos_token_ids = frozenset(eos_token_ids)
        self.words = bitmask_words(vocab_size)
        # llguidance's rows span max(model vocabulary, tokenizer vocabulary); usually the same.
        self.matcher_words = bitmask_words(matcher_vocab_size or vocab_size)

    def fill_bitmask(self, proposed: Sequence[int], out: np.ndarray) -> None:
        _check_rows(out, len(proposed) + 1, self.words)
        masks = out
        if self.matcher_words != self.words:
            masks = np.empty((len(proposed) + 1, self.matcher_words), dtype=np.int32)
        matcher = self.matcher
        llg_numpy.fill_next_token_bitmask(matcher, masks, 0)
        consumed = 0
        for token in proposed:
            # Stop at the first draft the grammar refuses (consuming it would leave the matcher
            # in its error state for good), and at EOS or a stop: nothing follows them.
            if (
                token in self.eos_token_ids
                or matcher.is_stopped()
                or matcher.validate_tokens([token]) != 1
            ):
                break
            matcher.consume_token(token)
            consumed += 1
            llg_numpy.fill_next_token_bitmask(matcher, masks, consumed)
        if masks is not out:
            out[: consumed + 1] = masks[: consumed + 1, : self.words]
        out[consumed + 1 : len(proposed) + 1] = ALL_ALLOWED
        if consumed:
            matcher.rollback(consumed)

    def accept(self, token_id: int) -> bool:
        """False: the token was not allowed, and the matcher stays in its error state (it then
        allows only EOS and is_finished is true)."""
        if self.matcher.is_stopped():
            # The grammar is complete: EOS ends the sequence (llguidance takes it as a no-op).
            return token_id in self.eos_token_ids
        return self.matcher.consume_token(token_id)

    @property
    def is_finished(self) -> bool:
        return self.matcher.is_stopped()


def fill_bitmasks(
    items: Sequence[tuple[TokenConstraint, Sequence[int]]],
    out: np.ndarray,
    executor: llguidance.LLExecutor | None = None,
) -> None:
    """Fill a step's bitmask rows: item k (constraint, proposed) takes len(proposed) + 1 rows of
    `out`, items one after another. Grammar constraints are computed together on llguidance's
    thread pool; any other constraint fills its own rows."""
    total = sum(len(proposed) + 1 for _, proposed in items)
    if total > len(out):
        raise ValueError(f"{total} bitmask rows needed, out has {len(out)}")
    plain, drafted, row = [], [], 0
    for constraint, proposed in items:
        count = len(proposed) + 1
        rows = out[row : row + count]
        grammar = _grammar_of(constraint)
        if grammar is not None and grammar.matcher_words == out.shape[1]:
            _check_rows(rows, count, grammar.words)
            if proposed:
                drafted.append((grammar.matcher, row, list(proposed)))
            else:
                plain.append((grammar.matcher, row))
        else:
            constraint.fill_bitmask(proposed, rows)
        row += count
    if not (plain or drafted):
        return
    _check_rows(out, 0, out.shape[1])
    executor = executor or mask_executor()
    if plain:
        llg_numpy.fill_next_token_bitmask_par(executor, plain, out)
    if drafted:
        # llguidance takes rows with drafts apart (it refuses an empty draft list).
        llg_numpy.fill_next_token_bitmask_par_with_draft_tokens(executor, drafted, out)
        for _, start, proposed in drafted:
            # It zeroes the rows after a refused draft (and after EOS); allow all there instead,
            # so that no row is all -inf: verification discards those rows anyway.
            after = out[start + 1 : start + len(proposed) + 1]
            after[~after.any(axis=1)] = ALL_ALLOWED


def _grammar_of(constraint: TokenConstraint) -> GrammarConstraint | None:
    """The grammar that alone decides a constraint's rows (also behind a reasoning gate whose
    reasoning has ended), so that it can join the batch; None for any other constraint."""
    while isinstance(constraint, ReasoningGate) and constraint.ended:
        constraint = constraint.inner
    return constraint if isinstance(constraint, GrammarConstraint) else None


@functools.cache
def mask_executor() -> llguidance.LLExecutor:
    """llguidance's thread pool for batched masks, one per process (80% of the CPUs, at most 32)."""
    return llguidance.LLExecutor()


def _check_rows(out: np.ndarray, rows: int, words: int) -> None:
    # llguidance writes through a raw pointer: the array must be exactly what it assumes.
    if out.dtype != np.int32 or out.ndim != 2 or not out.flags.c_contiguous:
        raise ValueError("a bitmask must be a C-contiguous int32 [rows, words] array")
    if out.shape[0] < rows or out.shape[1] != words:
        raise ValueError(f"bitmask of shape {out.shape}; need {rows} rows of {words} words")
