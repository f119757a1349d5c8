"""The real GGUF demo models on the CUDA path with their weights kept quantized, as a GPU holds
them: SmolLM2-135M (Q4_1, Q8_0 embedding) and Qwen2.5-Coder-0.5B (Q4_K_M: Q4_K, Q5_0, Q6_K and
Q8_0, q/k/v of mixed types fused) on the emulated device, which runs kernels/ on the CPU.

Oracle: the reference backend (NumPy, float32, weights dequantized by the `gguf` package). The
64 positions of a text run as a prefill chunk of 56 tokens (GGUF matmuls of many rows:
dequantize into the scratch buffer, then the cuBLAS-like product) and one of 8 (the decode
kernels reading the blocks in place). The emulator is slow, so these are few and short.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.backends.memory import weight_memory
from nanovllm.demo import demo_model_path
from nanovllm.models import load_model

PROSE = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from wine making. "
    "Within fifty years, presses were running in more than two hundred cities across Europe, "
    "and the price of a book fell so far that ordinary merchants, students and priests could own "
    "several."
)
CODE = '''def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge overlapping closed intervals and return them sorted by their start."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged
'''


@pytest.mark.parametrize(
    ("name", "text", "formats"),
    [
        ("smollm2-demo", PROSE, {"q4_1", "q8_0"}),
        ("qwen2.5-coder-demo", CODE, {"q4_k", "q5_0", "q6_k", "q8_0"}),
    ],
)
def test_quantized_weights_give_the_references_top_token_at_every_position(name, text, formats):
    path = str(demo_model_path(name))
    device = load_model(path, device="cuda-emulated", dtype="float32")
    assert set(weight_memory(device.model).matrices) == formats  # no matrix dequantized
    ids = device.tokenizer.encode(text)[:64]
    assert len(ids) == 64
    got = device.logits(ids, chunks=[56, 8])
    del device
    gc.collect()  # the reference's float32 weights are 6x the file
    want = load_model(path, device="cpu-reference").logits(ids)
    assert (got.argmax(axis=1) == want.argmax(axis=1)).all()
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()


def test_smollm2_on_quantized_weights_in_float16_still_answers_paris():
    llm = LLM("smollm2-demo", device="cuda-emulated", dtype="float16", num_blocks=16)
    outputs = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=8),
        use_tqdm=False,
    )
    assert "Paris" in outputs[0].outputs[0].text
    assert sum(llm.engine.runner.decode_graphs.bucket_steps.values()) > 0  # padded decode steps
