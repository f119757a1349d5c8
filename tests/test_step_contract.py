"""The step contract (nanovllm/engine/step.py) and the assembly around it: the scheduler states
speculative slots itself, building an output changes nothing, DELTA outputs carry only what is
new, stop strings are bounded, the token-mask seam restricts sampling, a model the backend has
no kernel for is refused before its weights load, and `--num-blocks auto` sizes the KV cache
for the target and the draft together."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from checkpoints import prompt_ids

from nanovllm import LLM, SamplingParams
from nanovllm.backends.cuda import CUDABackend
from nanovllm.engine.detokenizer import IncrementalDetokenizer, StopStrings
from nanovllm.errors import NanovllmError
from nanovllm.models.loader import load_model
from nanovllm.sampling_params import MAX_STOP_STRINGS, RequestOutputKind
from nanovllm.structured.token_filters import AllowedTokens

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_path(checkpoint_factory) -> str:
    return str(checkpoint_factory("llama3"))


@pytest.fixture(scope="module")
def llm(model_path) -> LLM:
    return LLM(model_path, device="cpu", num_blocks=64, block_size=4)


def drain(engine) -> list:
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    return outputs


# ---- the scheduler's record ---------------------------------------------------------------------
def test_a_decode_step_states_its_speculative_slots_apart_from_its_known_token(model_path):
    llm = LLM(model_path, device="cpu", speculative_method="ngram", num_speculative_tokens=3)
    engine = llm.engine
    engine.add_request("r", prompt_ids(10), SamplingParams(max_tokens=3, **GREEDY))
    prefill = engine.scheduler.schedule()
    assert [(s.num_tokens, s.num_spec_tokens) for s in prefill.scheduled] == [(10, 0)]
    engine.scheduler.update(prefill, engine.runner.execute(prefill))  # no token appended yet
    seq = engine.requests["r"].seqs[0]
    seq.token_ids.append(5)  # as the output processor would after the prefill's sample
    decode = engine.scheduler.schedule()
    # max_tokens 3, one generated: at most one more guess than the bonus token leaves room for.
    assert [(s.num_tokens, s.num_spec_tokens) for s in decode.scheduled] == [(1, 1)]
    assert decode.num_tokens == 2


# ---- outputs --------------------------------------------------------------------------------------
def test_building_an_output_changes_nothing(llm):
    engine = llm.engine
    params = SamplingParams(max_tokens=6, logprobs=2, output_kind=RequestOutputKind.DELTA, **GREEDY)
    engine.add_request("same", prompt_ids(8), params)
    engine.step()
    engine.step()
    request = engine.requests["same"]
    first, second = engine.processor.output(request), engine.processor.output(request)
    assert first == second and first.outputs[0].token_ids
    drain(engine)


@pytest.mark.parametrize("n", [1, 3])
def test_delta_outputs_carry_only_the_new_tokens_and_add_up_to_the_whole(llm, n):
    """A stream's outputs hold each token (and its logprobs) once: what a slow reader leaves
    queued grows with the tokens generated, not with their square."""
    engine, prompt = llm.engine, prompt_ids(9)
    delta = SamplingParams(n=n, max_tokens=40, logprobs=5, seed=3, temperature=0.8, ignore_eos=True,
                           output_kind=RequestOutputKind.DELTA)  # fmt: skip
    engine.add_request("delta", prompt, delta)
    outputs = drain(engine)
    final = llm.generate([prompt], delta.clone(output_kind=RequestOutputKind.FINAL_ONLY))[0]
    for index in range(n):
        choices = [c for o in outputs for c in o.outputs if c.index == index]
        assert sum(len(c.logprobs) for c in choices) == 40
        assert [t for c in choices for t in c.token_ids] == final.outputs[index].token_ids
        assert "".join(c.text for c in choices) == final.outputs[index].text
        assert [lp.token_id for c in choices for lp in c.logprobs] == final.outputs[index].token_ids


# ---- stop strings ---------------------------------------------------------------------------------
def test_too_many_stop_strings_are_refused():
    with pytest.raises(ValueError, match=f"at most {MAX_STOP_STRINGS}"):
        SamplingParams(stop=[f"stop{i}" for i in range(MAX_STOP_STRINGS + 1)])
    with pytest.raises(ValueError, match="at most 512 characters"):
        SamplingParams(stop=["x" * 513])


def test_stop_matching_looks_only_at_the_tail_a_new_token_can_complete(llm):
    stops = [f"never-{i}-xyz" for i in range(MAX_STOP_STRINGS)]
    detok = IncrementalDetokenizer(llm.tokenizer, [], stop=stops)
    seen = []
    first = detok.stop_strings.first
    detok.stop_strings.first = lambda text, new_from: (
        seen.append((len(text), new_from)) or first(text, new_from)
    )
    ids = llm.tokenizer.encode("Readability counts. " * 60, add_special_tokens=False)
    detok.add_tokens(ids)
    longest = max(map(len, stops))
    assert len(detok.text) > 1000
    # Each search covers at most the held-back tail plus the new text, however long the output.
    assert all(new_from <= longest - 1 for _, new_from in seen)
    assert max(length - new_from for length, new_from in seen) < 40


def test_stop_strings_sharing_a_last_character_find_the_earliest_end():
    stops = StopStrings(["bcd", "zd", "cd", "abcd"])
    assert stops.first("xxabcdzd", 0) == (2, "abcd")  # same end as bcd and cd: the longest
    assert stops.first("xxzd", 2) == (2, "zd")
    assert stops.first("zd", 2) is None


# ---- the token-mask seam --------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [{}, dict(speculative_method="ngram", num_speculative_tokens=3)])
def test_a_constraint_restricts_every_sampled_token_to_its_allowed_set(model_path, spec):
    llm = LLM(model_path, device="cpu", **spec)
    engine, prompt = llm.engine, prompt_ids(12)
    allowed = [5, 17, 40, 41, 42, 99, 250]
    engine.add_request("c", prompt, SamplingParams(max_tokens=24, **GREEDY))
    seq = engine.requests["c"].seqs[0]
    seq.constraint = AllowedTokens(allowed, engine.model_config.vocab_size)
    drain(engine)
    tokens = seq.output_token_ids
    assert len(tokens) == 24 and set(tokens) <= set(allowed)
    # Greedy under the mask: at each position the best allowed token of the full model.
    logits = load_model(model_path).logits(prompt + tokens[:-1])[len(prompt) - 1 :]
    assert tokens == [allowed[int(np.argmax(row[allowed]))] for row in logits]


# ---- assembly -------------------------------------------------------------------------------------
def test_a_head_dim_without_a_kernel_is_refused_before_any_weight_loads(
    checkpoint_factory, tmp_path
):
    folder = shutil.copytree(checkpoint_factory("tied"), tmp_path / "head_dim_8")
    config = json.loads((folder / "config.json").read_text())
    config["head_dim"] = 8  # the weights no longer fit: loading them would fail differently
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(NanovllmError) as error:
        LLM(str(folder), device="cuda-emulated")
    message = str(error.value)
    assert "head_dim 8" in message and "16, 32, 64, 80, 96, 128, 256" in message


def test_auto_kv_cache_sizing_counts_the_draft_model(checkpoint_factory, monkeypatch):
    gib, utilization = 2**30, 0.5
    free, total = int(1.2 * gib), 2 * gib
    monkeypatch.setattr(CUDABackend, "memory_info", lambda self: (free, total))
    target, draft = str(checkpoint_factory("llama3")), str(checkpoint_factory("qwen3_qk_norm"))
    args = dict(device="cuda-emulated", dtype="float32", num_blocks="auto",
                gpu_memory_utilization=utilization, max_num_seqs=4)  # fmt: skip
    llm = LLM(target, draft_model=draft, **args)
    caches = [*llm.engine.runner.kv_caches, *llm.engine.runner.proposer.runner.kv_caches]
    kv_bytes = sum(k.nbytes + v.nbytes for k, v in caches)
    in_use = total - free
    # Target and draft caches together stay within the budget the flag allows...
    assert in_use + kv_bytes <= utilization * total
    # ...and their blocks are sized together: the target alone would have taken more blocks.
    alone = LLM(target, **args)
    assert llm.engine.block_manager.num_blocks < alone.engine.block_manager.num_blocks


# ---- a slow stream ----------------------------------------------------------------------------
def queued_bytes(llm: LLM, max_tokens: int) -> tuple[int, int]:
    """A stream (n=4, 5 logprobs a token) whose client reads nothing until generation ends:
    (bytes the server's engine thread left queued for it, tokens generated)."""
    import pickle

    from nanovllm.server.engine_thread import EngineThread

    thread = EngineThread(llm.engine)
    thread.start()
    try:
        params = SamplingParams(n=4, max_tokens=max_tokens, logprobs=5, ignore_eos=True,
                                temperature=1.0, output_kind=RequestOutputKind.DELTA)  # fmt: skip
        sub = thread.submit([prompt_ids(8)], params, True)
        deadline = time.monotonic() + 120
        while llm.engine.has_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.05)
        queued = []
        while not sub.outputs.empty():
            queued.append(sub.outputs.get_nowait())
        tokens = sum(len(c.token_ids) for _, out in queued for c in out.outputs)
        return len(pickle.dumps(queued)), tokens
    finally:
        thread.stop()


def test_a_stream_nobody_reads_queues_memory_in_proportion_to_its_length(model_path):
    """The server streams DELTA outputs: what waits for a slow client grows linearly with the
    stream (CUMULATIVE outputs, each holding everything so far, grew with its square)."""
    llm = LLM(model_path, device="cpu", num_blocks=256, block_size=4)  # no preemption
    short_bytes, short_tokens = queued_bytes(llm, 40)
    long_bytes, long_tokens = queued_bytes(llm, 160)
    assert (short_tokens, long_tokens) == (160, 640)
    assert long_bytes < 4.6 * short_bytes  # linear: ~4x; quadratic would be ~16x
