"""Structured outputs inside the engine, on a tiny random checkpoint: constraints built from
SamplingParams, grammars compiled off the engine thread (a sequence waiting for its grammar
holds up no one and keeps its place), each sample's own grammar state, logit_bias in vLLM's
order, the grammar winning over min_tokens, explicit errors, and a grammar's state through
preemption and speculative decoding. Oracles: llguidance's own matcher, the model's logits
computed on their own (`load_model(...).logits`), and the engine without the feature.
"""

from __future__ import annotations

import re
from concurrent.futures import Future
from pathlib import Path

import llguidance
import numpy as np
import pytest
from checkpoints import perturbed_copy, prompt_ids, train_tokenizer

from nanovllm import LLM, SamplingParams
from nanovllm.engine.llm_engine import LLMEngine, ModelInfo
from nanovllm.engine.structured_outputs import StructuredOutputs
from nanovllm.models.loader import load_model
from nanovllm.structured import ParameterError, StructuredOutputsParams

GREEDY = dict(temperature=0.0, ignore_eos=True)
# Short objects with bounded fields: a random model cannot wander far inside them.
SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "tag": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
    },
    "required": ["n", "tag", "ok"],
    "additionalProperties": False,
}
JSON = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)


@pytest.fixture(scope="module")
def model_path(checkpoint_factory) -> str:
    return str(checkpoint_factory("llama3"))


@pytest.fixture(scope="module")
def llm(model_path) -> LLM:
    return LLM(model_path, device="cpu", num_blocks=128, block_size=4, max_num_seqs=8)


def oracle(llm: LLM, params: StructuredOutputsParams) -> llguidance.LLMatcher:
    """llguidance's own matcher for the grammar, fresh, on the engine's tokenizer."""
    compiler = llm.engine.structured.compiler
    return llguidance.LLMatcher(compiler.ll_tokenizer, compiler.compile(params).text)


def follows(
    llm: LLM, params: StructuredOutputsParams, token_ids: list[int]
) -> llguidance.LLMatcher:
    matcher = oracle(llm, params)
    eos = set(llm.engine.eos_token_ids)
    for token in token_ids:
        if token in eos:
            assert matcher.is_accepting()
            break
        assert matcher.consume_token(token), f"token {token} breaks the grammar"
    return matcher


def drain(engine) -> list:
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    return outputs


# ---- grammars compiled off the engine thread ------------------------------------------------
class HeldCompiler:
    """A GrammarCompiler whose compiles finish only when the test says so."""

    def __init__(self, real) -> None:
        self.real = real
        self.held: list[tuple[Future, StructuredOutputsParams]] = []

    def submit(self, params, field=None) -> Future:
        future: Future = Future()
        self.held.append((future, params))
        return future

    def release(self, error: Exception | None = None) -> None:
        for future, params in self.held:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(self.real.compile(params))
        self.held.clear()


def engine_with(llm: LLM, model_path: str, compiler, **engine_args) -> LLMEngine:
    """A fresh engine from a built one's kind of parts, its grammars compiled by `compiler`."""
    parts = LLM(model_path, device="cpu", block_size=4, **engine_args).engine
    info = ModelInfo(parts.model_config, parts.tokenizer, parts.generation_config,
                     parts.eos_token_ids, parts.max_model_len)  # fmt: skip
    vocab = parts.model_config.vocab_size
    structured = StructuredOutputs(parts.tokenizer, vocab, parts.eos_token_ids, compiler=compiler)
    return LLMEngine(parts.config, info, parts.scheduler, parts.runner, parts.processor, structured)


def test_a_sequence_waiting_for_its_grammar_is_passed_by_and_keeps_its_place(llm, model_path):
    held = HeldCompiler(llm.engine.structured.compiler)
    engine = engine_with(llm, model_path, held, max_num_seqs=2, num_blocks=64)
    prompt = prompt_ids(8)
    engine.add_request("A", prompt, SamplingParams(max_tokens=4, structured_outputs=JSON, **GREEDY))
    engine.add_request("B", prompt, SamplingParams(max_tokens=2, **GREEDY))
    engine.add_request("C", prompt, SamplingParams(max_tokens=12, **GREEDY))
    engine.add_request("D", prompt, SamplingParams(max_tokens=2, **GREEDY))
    admitted: list[str] = []

    def step() -> None:
        engine.step()
        for seq in engine.scheduler.running:
            if seq.request.request_id not in admitted:
                admitted.append(seq.request.request_id)

    step()  # A's grammar is compiling: B and C take the two slots, in order
    assert admitted == ["B", "C"]
    assert [s.request.request_id for s in engine.scheduler.waiting] == ["A", "D"]
    held.release()
    while "A" not in admitted:  # B ends after 2 tokens: its slot goes to A, not to D
        step()
    assert admitted == ["B", "C", "A"]
    drain(engine)
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


def test_a_grammar_that_fails_to_compile_ends_its_request_with_an_error(llm, model_path):
    held = HeldCompiler(llm.engine.structured.compiler)
    engine = engine_with(llm, model_path, held, num_blocks=64)
    engine.add_request("bad", prompt_ids(8), SamplingParams(max_tokens=4, structured_outputs=JSON))
    engine.add_request("free", prompt_ids(8), SamplingParams(max_tokens=3, **GREEDY))
    held.release(ParameterError("structured_outputs.json", "invalid JSON schema: unsupported"))
    outputs = {o.request_id: o for o in drain(engine) if o.finished}
    bad = outputs["bad"].outputs[0]
    assert bad.finish_reason == "error" and bad.token_ids == []
    assert bad.error == "structured_outputs.json: invalid JSON schema: unsupported"
    assert outputs["free"].outputs[0].finish_reason == "length"
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


def test_a_bad_grammar_is_refused_before_the_request_is_queued(llm):
    with pytest.raises(ValueError, match=r"regex: invalid or unsupported regex"):
        llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(regex="(")))
    assert not llm.engine.has_unfinished_requests()


# ---- constraints from SamplingParams ---------------------------------------------------------
def test_greedy_output_under_a_schema_follows_the_grammar_and_its_best_allowed_tokens(
    llm, model_path
):
    prompt = prompt_ids(10)
    params = SamplingParams(max_tokens=40, structured_outputs=JSON, temperature=0.0)
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    matcher = follows(llm, JSON, out.token_ids)
    assert out.finish_reason == "stop" and matcher.is_accepting()
    # At each position: the best token of the model's own logits among those llguidance allows.
    logits = load_model(model_path).logits(prompt + out.token_ids[:-1])[len(prompt) - 1 :]
    check = oracle(llm, JSON)
    for row, token in zip(logits, out.token_ids, strict=True):
        allowed = np.frombuffer(check.compute_bitmask(), dtype=np.uint8)
        bits = np.unpackbits(allowed, bitorder="little")[: len(row)].astype(bool)
        assert token == int(np.argmax(np.where(bits, row, -np.inf)))
        check.consume_token(token)


def test_every_sample_of_n_has_its_own_grammar_state(llm):
    choices = ["Beautiful is better", "Simple", "The quick brown fox"]
    params = SamplingParams(n=4, temperature=1.5, seed=7, max_tokens=20,
                            structured_outputs=StructuredOutputsParams(choice=choices))  # fmt: skip
    engine = llm.engine
    engine.add_request("n", prompt_ids(6), params)
    request = engine.requests["n"]
    drain(engine)
    assert len({id(seq.constraint) for seq in request.seqs}) == 4
    assert all(seq.detokenizer.text in choices for seq in request.seqs)
    assert all(seq.finish_reason == "stop" for seq in request.seqs)


def test_allowed_token_ids_and_bad_words_combine_with_a_grammar(llm):
    tok = train_tokenizer()
    digits = [tok.token_to_id(d) for d in "0123"]
    regex = StructuredOutputsParams(regex="[0-9]{6}")
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=3, structured_outputs=regex,
                            allowed_token_ids=digits, bad_words=["2"])  # fmt: skip
    out = llm.generate([prompt_ids(6)], params, use_tqdm=False)[0].outputs[0]
    assert re.fullmatch("[013]{6}", out.text), out.text


def test_the_grammar_wins_over_min_tokens_where_it_allows_only_eos(llm):
    # A complete grammar ends the sequence at once, min_tokens or not.
    only = StructuredOutputsParams(choice=["Simple"])
    params = SamplingParams(max_tokens=12, min_tokens=8, temperature=0.0, structured_outputs=only)
    out = llm.generate([prompt_ids(6)], params, use_tqdm=False)[0].outputs[0]
    assert out.text == "Simple" and out.finish_reason == "stop"
    # A mask that allows only EOS meets min_tokens, which masks EOS: no all -inf row, the mask
    # wins, and EOS is taken (the stop rule itself still waits for min_tokens).
    eos = llm.engine.eos_token_ids[-1]  # not 0, where an argmax over all -inf would land
    params = SamplingParams(max_tokens=12, min_tokens=3, temperature=0.0, allowed_token_ids=[eos])
    out = llm.generate([prompt_ids(6)], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [eos] * 4 and out.finish_reason == "stop"


def test_a_refused_token_ends_the_request_with_an_explicit_error(llm):
    tok = train_tokenizer()
    letters = [tok.token_to_id(c) for c in "abc"]  # the grammar wants digits only
    params = SamplingParams(max_tokens=8, temperature=0.0, allowed_token_ids=letters,
                            structured_outputs=StructuredOutputsParams(regex="[0-9]+"))  # fmt: skip
    out = llm.generate([prompt_ids(6)], params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "error" and out.token_ids == []
    assert "not allowed by the request's constraints" in out.error
    assert llm.engine.stats().num_free_blocks == llm.engine.stats().num_blocks


def test_a_grammar_that_cannot_end_within_max_tokens_stops_at_length_with_a_valid_prefix(llm):
    endless = StructuredOutputsParams(regex="(ab ){40}")
    params = SamplingParams(max_tokens=7, temperature=0.8, seed=1, structured_outputs=endless)
    out = llm.generate([prompt_ids(6)], params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 7
    assert not follows(llm, endless, out.token_ids).is_accepting()
    assert "ab ab".startswith(out.text[:5])


# ---- logit_bias -----------------------------------------------------------------------------
def test_logit_bias_steers_greedy_decoding_but_not_the_reported_logprobs(llm, model_path):
    prompt, favoured = prompt_ids(10), 77
    params = SamplingParams(max_tokens=3, logprobs=0, logit_bias={favoured: 100}, **GREEDY)
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [favoured] * 3
    logits = load_model(model_path).logits(prompt + out.token_ids[:-1])[len(prompt) - 1 :]
    for row, entry in zip(logits, out.logprobs, strict=True):  # vLLM: raw logits' logprobs
        raw = row - np.logaddexp.reduce(row.astype(np.float64))
        assert entry.logprob == pytest.approx(raw[favoured], abs=1e-3)


def test_min_tokens_masks_eos_before_logit_bias_adds_to_it(llm):
    eos = llm.engine.eos_token_ids
    params = SamplingParams(max_tokens=10, min_tokens=4, temperature=0.0,
                            logit_bias={t: 100 for t in eos})  # fmt: skip
    out = llm.generate([prompt_ids(10)], params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.token_ids[-1] in eos  # EOS right after min_tokens


# ---- preemption, speculation, many requests --------------------------------------------------
def constrained_batch(count: int, seed: int = 0) -> list[SamplingParams]:
    kinds = [JSON, StructuredOutputsParams(regex="[a-z]{3}( [a-z]{2,5}){4}"), None]
    return [
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                       structured_outputs=kinds[i % len(kinds)])
        for i in range(count)
    ]  # fmt: skip


def prompts_for(count: int) -> list[list[int]]:
    base = prompt_ids(20)
    return [base[: 6 + (i * 5) % 14] for i in range(count)]


def test_preemption_keeps_each_sequences_grammar_state(model_path, llm):
    prompts, params = prompts_for(8), constrained_batch(8)
    roomy = llm.generate(prompts, params, use_tqdm=False)
    crowded = LLM(model_path, device="cpu", num_blocks=14, block_size=4, max_num_seqs=8)
    outputs = crowded.generate(prompts, params, use_tqdm=False)
    assert crowded.engine.stats().num_preemptions > 2
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in roomy]


@pytest.fixture(scope="module")
def draft(model_path, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("near_draft")
    return str(perturbed_copy(Path(model_path), folder, scale=0.03, seed=5))


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_output_under_a_grammar_is_the_same_with_speculative_decoding(
    model_path, llm, draft, method
):
    prompts, params = prompts_for(6), constrained_batch(6)
    plain = llm.generate(prompts, params, use_tqdm=False)
    spec = dict(speculative_method="ngram") if method == "ngram" else dict(draft_model=draft)
    fast = LLM(model_path, device="cpu", num_blocks=128, block_size=4, max_num_seqs=8,
               num_speculative_tokens=3, **spec)  # fmt: skip
    outputs = fast.generate(prompts, params, use_tqdm=False)
    stats = fast.engine.stats().spec
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in plain]


def test_200_mixed_constrained_and_free_requests_leave_no_block_behind(llm):
    engine = llm.engine
    params = [p.clone(max_tokens=4 + i % 5, temperature=0.7, seed=i)
              for i, p in enumerate(constrained_batch(200))]  # fmt: skip
    outputs = []
    for i, (prompt, p) in enumerate(zip(prompts_for(200), params, strict=True)):
        engine.add_request(f"mix{i}", prompt, p)
        if i % 7 == 0:
            outputs += engine.step()
        if i % 50 == 49:
            engine.abort_request(f"mix{i - 3}")
    finished = [o for o in outputs + drain(engine) if o.finished]
    assert len(finished) >= 196
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks and not engine.scheduler.waiting
    assert stats.masks.num_rows > 0 and stats.masks.seconds > 0


# ---- the mask changes only the forbidden tokens' probability ---------------------------------
def test_sampling_under_a_grammar_mask_follows_the_renormalized_distribution(llm):
    """With a grammar that forbids a known set, the draws over the rest follow the
    unconstrained softmax renormalized over the allowed tokens (chi-square, 20,000 draws), the
    mask applied by the backend's op as the runner applies it."""
    from test_sampler import DRAWS, chi_square_p, row, softmax

    from nanovllm.engine.sampler import Sampler
    from nanovllm.structured.constraint import fill_bitmasks

    digits = StructuredOutputsParams(regex="[0-9]")
    vocab = llm.engine.model_config.vocab_size
    logits = np.random.default_rng(5).normal(0.0, 1.5, vocab).astype(np.float32)
    allowed = np.unpackbits(
        np.frombuffer(oracle(llm, digits).compute_bitmask(), dtype=np.uint8), bitorder="little"
    )[:vocab].astype(bool)
    assert 5 <= allowed.sum() < vocab // 10  # the single-digit tokens (and EOS: none yet)
    constraint = llm.engine.structured.compiler.compile(digits).constraint()
    one = np.empty((1, -(-vocab // 32)), dtype=np.int32)
    fill_bitmasks([(constraint, [])], one)
    masks = np.ascontiguousarray(np.tile(one, (DRAWS, 1)))
    masked = np.tile(logits, (DRAWS, 1))
    llm.engine.runner.backend.apply_token_bitmask(masked, masks, np.arange(DRAWS))
    out = Sampler(seed=11)(masked, [row(SamplingParams(temperature=1.0)) for _ in range(DRAWS)])
    counts = np.bincount(out.token_ids, minlength=vocab)
    expected = np.where(allowed, softmax(logits), 0.0)
    assert counts[~allowed].sum() == 0
    assert chi_square_p(counts, expected / expected.sum()) > 1e-3
    uniform = allowed / allowed.sum()  # the test can tell a wrong distribution apart
    assert chi_square_p(counts, uniform) < 1e-6


def test_the_cuda_backend_masks_the_logits_on_the_device_as_the_cpu_does(model_path, llm):
    """kernels/token_bitmask.cu through the whole engine (on the CUDA emulator): the same greedy
    tokens under a grammar as the NumPy backend."""
    prompts, params = prompts_for(2), constrained_batch(2)
    params = [p.clone(max_tokens=10) for p in params]
    cpu = llm.generate(prompts, params, use_tqdm=False)
    gpu = LLM(model_path, device="cuda-emulated", dtype="float32", num_blocks=32, block_size=4,
              max_num_seqs=2)  # fmt: skip
    outputs = gpu.generate(prompts, params, use_tqdm=False)
    assert gpu.engine.stats().masks.num_rows >= 10
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in cpu]


def test_a_request_whose_first_sample_is_refused_spawns_no_more_samples(llm):
    tok = train_tokenizer()
    letters = [tok.token_to_id(c) for c in "abc"]  # the grammar wants digits only
    params = SamplingParams(n=3, max_tokens=8, temperature=0.0, allowed_token_ids=letters,
                            structured_outputs=StructuredOutputsParams(regex="[0-9]+"))  # fmt: skip
    before = llm.engine.stats().num_finished_requests
    (result,) = llm.generate([prompt_ids(6)], params, use_tqdm=False)
    assert [o.finish_reason for o in result.outputs] == ["error"]  # one sample, ended at once
    assert llm.engine.stats().num_finished_requests == before + 1
    assert llm.engine.stats().num_free_blocks == llm.engine.stats().num_blocks
