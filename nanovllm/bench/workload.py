"""Random workloads shared by the benchmarks: length ranges and random token-id prompts."""

from __future__ import annotations

import argparse

import numpy as np


def parse_range(text: str) -> tuple[int, int]:
    """'128' -> (128, 128); '32:256' -> (32, 256)."""
    low, _, high = text.partition(":")
    try:
        bounds = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX, got {text!r}") from None
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return bounds


def random_requests(num: int, input_len, output_len, vocab_size: int, seed: int):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(input_len[0], input_len[1] + 1, size=num)
    outputs = rng.integers(output_len[0], output_len[1] + 1, size=num)
    prompts = [rng.integers(0, vocab_size, size=n).tolist() for n in inputs]
    return prompts, outputs.tolist()
