"""Prompt logprobs: the LM head over the prompt rows of the sequences that asked for them
(`SamplingParams.prompt_logprobs`), in the same forward pass as their prefill chunk.

Row p of a prompt scores token p + 1 given the tokens before it; the rows go through the LM
head a bounded number at a time, so a long prompt never holds [rows, vocab] logits at once.
"""

from __future__ import annotations

import numpy as np

from nanovllm.engine.batch import ForwardItem, StepInputs
from nanovllm.engine.logprobs import TokenLogprobs, ranked_logprobs

ROWS_PER_PASS = 64  # 64 x a 152k vocabulary in float32: 39 MB of logits at a time


def prompt_logprobs(
    model, backend, hidden, inputs: StepInputs, items: list[ForwardItem]
) -> list[list[TokenLogprobs]]:
    """Per item, the TokenLogprobs of the prompt tokens its prompt rows score ([] for the rest)."""
    out: list[list[TokenLogprobs]] = [[] for _ in items]
    owners, targets, counts = [], [], []
    for i, item in enumerate(items):
        if item.num_prompt_logits:
            owners += [i] * item.num_prompt_logits
            targets += item.prompt_targets
            counts += [item.seq.params.prompt_logprobs] * item.num_prompt_logits
    rows, targets = inputs.prompt_rows, np.asarray(targets, dtype=np.int64)
    for lo in range(0, len(owners), ROWS_PER_PASS):
        hi = min(lo + ROWS_PER_PASS, len(owners))
        logits = model.compute_logits(hidden[backend.asarray(rows[lo:hi])])
        scored = ranked_logprobs(backend, logits, targets[lo:hi], counts[lo:hi])
        for owner, entry in zip(owners[lo:hi], scored, strict=True):
            out[owner].append(entry)
    return out
