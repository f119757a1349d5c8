"""The real demo model, SmolLM2-135M-Instruct from its Q4_1 GGUF, against transformers reading the
same file (`gguf_file=`): logits, greedy tokens, and a chat answer."""

from __future__ import annotations

import numpy as np
import pytest
from _text_fixtures import PARITY_TEXT as TEXT

from nanovllm import LLM, SamplingParams
from nanovllm.demo import demo_model_path
from nanovllm.models import load_model


@pytest.fixture(scope="module")
def gguf_path():
    return demo_model_path()


@pytest.fixture(scope="module")
def ours(gguf_path):
    return load_model(str(gguf_path), device="cpu")


@pytest.fixture(scope="module")
def oracle(gguf_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval()


def test_logits_match_transformers_top1_at_every_position(ours, oracle):
    import torch

    ids = ours.tokenizer.encode(TEXT)[:64]
    assert len(ids) == 64
    logits = ours.logits(ids)
    with torch.no_grad():
        reference = oracle(torch.tensor([ids])).logits[0].float().numpy()
    diff = float(np.abs(logits - reference).max())
    print(f"SmolLM2 GGUF, 64 positions: max abs logit diff vs transformers = {diff:.2e}")
    assert (logits.argmax(-1) == reference.argmax(-1)).all()
    assert diff < 1e-3  # float32 on both sides; the spread of logits is ~30


def test_greedy_continuation_matches_transformers(ours, oracle):
    import torch

    ids = ours.tokenizer.encode("The three primary colours are")
    with torch.no_grad():
        out = oracle.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert ours.greedy(ids, 24) == out[0, len(ids) :].tolist()


def test_chat_question_is_answered_with_paris(gguf_path):
    llm = LLM(str(gguf_path), device="cpu")
    outputs = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=32),
        use_tqdm=False,
    )
    text = outputs[0].outputs[0].text
    assert "Paris" in text, text
    assert outputs[0].outputs[0].finish_reason == "stop"
