"""Prompt logprobs (`SamplingParams.prompt_logprobs`, vLLM's shape) against transformers'
log-softmax of the same prompt: whole prefills, chunked prefills, a prompt whose prefix is in
the prefix cache, and a batch that mixes scored and plain requests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoints import prompt_ids

from nanovllm import LLM, SamplingParams
from nanovllm.outputs import Logprob

TOP = 3
TOLERANCE = 1e-4  # float32 on both sides, a tiny model


@pytest.fixture(scope="module")
def model_path(checkpoint_factory) -> str:
    return str(checkpoint_factory("llama3"))


@pytest.fixture(scope="module")
def oracle(model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

    def log_softmax(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1).numpy()

    return log_softmax


def make_llm(model_path: str, **kwargs) -> LLM:
    args = dict(device="cpu", block_size=4, num_blocks=128, max_num_seqs=4)
    return LLM(model_path, **(args | kwargs))


def scored(llm: LLM, prompts: list[list[int]], k: int = TOP) -> list:
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=k)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def assert_matches(prompt_logprobs: list, ids: list[int], reference: np.ndarray, k: int = TOP):
    """vLLM's shape: None first, then per token {id: Logprob} with the token and the k best."""
    assert len(prompt_logprobs) == len(ids)
    assert prompt_logprobs[0] is None
    for pos, entry in enumerate(prompt_logprobs[1:], start=1):
        row, token = reference[pos - 1], ids[pos]
        best = np.argsort(-row, kind="stable")[:k].tolist()
        assert list(entry)[0] == token  # the prompt's own token comes first
        assert set(entry) == {token, *best}
        assert isinstance(entry[token], Logprob)
        assert entry[token].rank == int((row >= row[token]).sum())
        for token_id, logprob in entry.items():
            assert abs(logprob.logprob - row[token_id]) < TOLERANCE, (pos, token_id)
            if token_id != token:
                assert logprob.rank == best.index(token_id) + 1


@pytest.mark.parametrize(
    ("device", "budget"),
    [("cpu", 512), ("cpu", 5), ("cuda-emulated", 5)],
    ids=["one-prefill", "chunks-of-5", "emulated-cuda-chunks-of-5"],
)
def test_prompt_logprobs_equal_transformers_log_softmax(model_path, oracle, device, budget):
    ids = prompt_ids(22)
    dtype = "float32" if device == "cuda-emulated" else "auto"
    llm = make_llm(model_path, max_num_batched_tokens=budget, device=device, dtype=dtype)
    (out,) = scored(llm, [ids])
    assert_matches(out.prompt_logprobs, ids, oracle(ids))
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_a_cached_prefix_still_yields_every_prompt_logprob(model_path, oracle):
    ids = prompt_ids(22)
    llm = make_llm(model_path)
    plain = SamplingParams(temperature=0, max_tokens=2)
    llm.generate([{"prompt_token_ids": ids}], plain, use_tqdm=False)  # fills the prefix cache
    before = llm.engine.stats().prefix_cache_hits
    llm.generate([{"prompt_token_ids": ids}], plain, use_tqdm=False)
    assert llm.engine.stats().prefix_cache_hits > before  # the prefix is in the cache
    (out,) = scored(llm, [ids])
    assert_matches(out.prompt_logprobs, ids, oracle(ids))


def test_scored_and_plain_requests_share_a_batch(model_path, oracle):
    a, b = prompt_ids(22), prompt_ids(13)
    llm = make_llm(model_path, max_num_batched_tokens=16)
    params = [
        SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1),
        SamplingParams(temperature=0, max_tokens=4),
        SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=0, n=2),
    ]
    outs = llm.generate([a, b, b], params, use_tqdm=False)
    assert_matches(outs[0].prompt_logprobs, a, oracle(a), k=1)
    assert outs[1].prompt_logprobs is None
    assert_matches(outs[2].prompt_logprobs, b, oracle(b), k=0)
    # The tokens are those of the same requests run without prompt logprobs.
    alone = llm.generate([a, b], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert outs[0].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert outs[2].outputs[0].token_ids == alone[1].outputs[0].token_ids


def test_vllm_prompt_dicts_and_plain_prompts_give_the_same_output(model_path):
    llm = make_llm(model_path)
    ids = prompt_ids(12)
    text = llm.tokenizer.decode(ids[1:])
    params = SamplingParams(temperature=0, max_tokens=5)
    outs = llm.generate(
        [text, {"prompt": text}, ids, {"prompt_token_ids": ids}], params, use_tqdm=False
    )
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert outs[2].outputs[0].token_ids == outs[3].outputs[0].token_ids
    assert outs[1].prompt == text and outs[3].prompt_token_ids == ids
    with pytest.raises(ValueError, match="multi_modal_data"):
        llm.generate({"prompt": text, "multi_modal_data": {}}, params, use_tqdm=False)
