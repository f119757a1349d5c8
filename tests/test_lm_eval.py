"""lm-evaluation-harness against `nanovllm serve`, and the real demo model's prompt logprobs.

lm-eval itself is the client: its `local-completions` model with `tokenizer_backend=remote`
(which reads `/tokenizer_info` and tokenizes through `/tokenize`) runs a local `loglikelihood`
task and a local `multiple_choice` task (JSONL files, no Hub) against a server on SmolLM2's
GGUF. The oracle is transformers reading the same GGUF: every loglikelihood lm-eval reports
must equal the sum of transformers' log-softmax over the continuation's tokens within 1e-3 per
token, and every multiple-choice answer must be transformers' best choice.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _server_fixtures import start_server

from nanovllm.demo import demo_model_path

PER_TOKEN = 1e-3
BUDGET = 48  # tokens per step: longer prompts are prefilled in chunks
LOGLIKELIHOOD_DOCS = [
    {"context": "The capital of France is", "continuation": " Paris"},
    {"context": "One, two, three, four,", "continuation": " five, six"},
    {"context": "Water boils at 100 degrees", "continuation": " Celsius at sea level."},
    {"context": "The quick brown fox ", "continuation": "jumps over the lazy dog"},
]
CHOICE_DOCS = [
    # lm-eval joins question and choice with its target_delimiter, a space.
    {"question": "Q: What colour is the sky on a clear day?\nA:",
     "choices": ["blue", "green", "red"], "answer": 0},
    {"question": "Q: How many legs does a spider have?\nA:",
     "choices": ["six", "eight", "ten"], "answer": 1},
    {"question": "Q: Which animal says moo?\nA:", "choices": ["a cat", "a cow"], "answer": 1},
]  # fmt: skip


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return demo_model_path()


@pytest.fixture(scope="module")
def server(gguf_path, tmp_path_factory):
    srv = start_server(gguf_path, tmp_path_factory.mktemp("lm-eval"),
                       "--enable-tokenizer-info-endpoint", "--served-model-name", "smollm2",
                       "--max-requests", "4", "--max-num-batched-tokens", str(BUDGET))  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oracle(gguf_path):
    """token ids -> [T, vocab] log-softmax of transformers on the same GGUF, float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()

    def log_softmax(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1).numpy()

    return log_softmax


def tokenize(server, text: str) -> list[int]:
    """As lm-eval's remote tokenizer does: /tokenize without special tokens."""
    return server.post("/tokenize", {"prompt": text, "add_special_tokens": False}).json()["tokens"]


def encode_pair(server, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) pair into tokens (trailing spaces of the
    context move to the continuation; the whole string is encoded, then cut)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = tokenize(server, context + continuation), tokenize(server, context)
    return ctx, whole[len(ctx) :]


def oracle_loglikelihood(oracle, ctx: list[int], cont: list[int]) -> float:
    ids = ctx + cont
    rows = oracle(ids)
    return float(sum(rows[len(ctx) - 1 + i, token] for i, token in enumerate(cont)))


def write_tasks(folder: Path) -> None:
    for name, docs in (("ll", LOGLIKELIHOOD_DOCS), ("mc", CHOICE_DOCS)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "ll.yaml").write_text(
        "task: nanovllm_loglikelihood\n" + common
        + f"dataset_kwargs:\n  data_files:\n    test: {folder / 'll.jsonl'}\n"
        "output_type: loglikelihood\ndoc_to_text: context\ndoc_to_target: continuation\n"
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n"
    )  # fmt: skip
    (folder / "mc.yaml").write_text(
        "task: nanovllm_multiple_choice\n" + common
        + f"dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: question\ndoc_to_choice: choices\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n"
    )  # fmt: skip


@pytest.fixture(scope="module")
def lm_eval_results(server, tmp_path_factory) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("tasks")
    write_tasks(folder)
    return simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": f"{server.url}/v1/completions", "model": "smollm2",
            "tokenizer_backend": "remote", "batch_size": 2, "max_retries": 1,
        },
        tasks=["nanovllm_loglikelihood", "nanovllm_multiple_choice"],
        task_manager=TaskManager(include_path=str(folder)),
        log_samples=True,
    )  # fmt: skip


def test_lm_eval_loglikelihoods_equal_transformers(server, oracle, lm_eval_results):
    samples = lm_eval_results["samples"]["nanovllm_loglikelihood"]
    assert len(samples) == len(LOGLIKELIHOOD_DOCS)
    for sample in samples:
        context, continuation = sample["arguments"][0]
        reported = sample["resps"][0][0][0]  # (loglikelihood, is_greedy) of its one request
        ctx, cont = encode_pair(server, context, continuation)
        expected = oracle_loglikelihood(oracle, ctx, cont)
        assert abs(reported - expected) <= PER_TOKEN * len(cont), (context, reported, expected)


def test_lm_eval_multiple_choice_picks_transformers_best_choice(server, oracle, lm_eval_results):
    samples = lm_eval_results["samples"]["nanovllm_multiple_choice"]
    assert len(samples) == len(CHOICE_DOCS)
    correct = 0
    for sample in samples:
        doc = sample["doc"]
        reported = [resp[0][0] for resp in sample["resps"]]  # one request per choice
        expected = []
        for (context, continuation), got in zip(sample["arguments"], reported, strict=True):
            ctx, cont = encode_pair(server, context, continuation)
            expected.append(oracle_loglikelihood(oracle, ctx, cont))
            assert abs(got - expected[-1]) <= PER_TOKEN * len(cont), (context, continuation)
        correct += int(np.argmax(expected)) == doc["answer"]
    acc = lm_eval_results["results"]["nanovllm_multiple_choice"]["acc,none"]
    assert acc == pytest.approx(correct / len(CHOICE_DOCS))


def test_prompt_logprobs_of_the_real_model_equal_transformers(server, oracle):
    """vLLM's `prompt_logprobs` over HTTP, the prompt prefilled in several steps."""
    text = " ".join(f"Item {i}: the {i}th line of a list." for i in range(12))
    ids = tokenize(server, text)
    assert len(ids) > 2 * BUDGET  # a chunked prefill
    body = {"model": "smollm2", "prompt": ids, "max_tokens": 1, "prompt_logprobs": 2}
    response = server.post("/v1/completions", body, timeout=300)
    scored = response.json()["choices"][0]["prompt_logprobs"]
    reference = oracle(ids)
    assert scored[0] is None and len(scored) == len(ids)
    for pos, entry in enumerate(scored[1:], start=1):
        row, token = reference[pos - 1], ids[pos]
        top = np.sort(row)[::-1]
        if top[1] - top[2] > PER_TOKEN:  # else the 2nd and 3rd best may swap
            assert set(map(int, entry)) == {token, *np.argsort(-row)[:2].tolist()}
        for token_id, logprob in entry.items():
            assert abs(logprob["logprob"] - row[int(token_id)]) <= PER_TOKEN, (pos, token_id)
