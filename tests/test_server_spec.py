"""A speculating server: same greedy text as without speculation, and vLLM's spec_decode metrics."""

from __future__ import annotations

import pytest
from _server_fixtures import start_server

from nanovllm import LLM, SamplingParams

K = 3


@pytest.fixture(scope="module")
def model(checkpoint_factory):
    return checkpoint_factory("llama3")


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    # The target is its own draft: greedy drafts are then always accepted, which pins the counts.
    proc = start_server(
        model, tmp_path_factory.mktemp("spec"), "--draft-model", str(model),
        "--num-speculative-tokens", str(K),
    )  # fmt: skip
    yield proc
    assert proc.stop() == 0, proc.log()


def test_speculating_server_gives_the_plain_greedy_text(server, model):
    prompt = "one two three one two three"
    body = {"model": str(model), "prompt": prompt, "max_tokens": 12, "temperature": 0}
    reply = server.post("/v1/completions", body).json()
    plain = LLM(str(model)).generate(
        prompt, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False
    )
    assert reply["choices"][0]["text"] == plain[0].outputs[0].text


def test_spec_decode_metrics_are_exported_and_consistent(server, model):
    before = server.metrics()
    body = {
        "model": str(model),
        "prompt": "a b c d",
        "max_tokens": 9,
        "temperature": 0,
        "ignore_eos": True,
    }
    assert server.post("/v1/completions", body).status_code == 200
    after = server.metrics()

    def delta(name, labels=()):
        return after[(name, labels)] - before.get((name, labels), 0.0)

    drafts = delta("vllm:spec_decode_num_drafts_total")
    drafted = delta("vllm:spec_decode_num_draft_tokens_total")
    accepted = delta("vllm:spec_decode_num_accepted_tokens_total")
    per_pos = [delta("vllm:spec_decode_num_accepted_tokens_per_pos_total", (("position", str(p)),)) for p in range(K)]  # fmt: skip
    # 9 tokens: the prefill gives 1, then steps of up to K accepted drafts + 1 bonus token each.
    assert drafts >= 2
    assert accepted == drafted  # the draft is the target: everything is accepted
    assert sum(per_pos) == accepted
    assert per_pos[0] == drafts
