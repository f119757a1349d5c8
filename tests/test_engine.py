"""The engine end to end on tiny random checkpoints: batching, preemption, prefix caching,
chunked prefill, n > 1, abort, and sampling/stop rules seen through LLMEngine / LLM.

Oracles, never the code under test: `load_model(...).greedy` (one sequence, contiguous KV
blocks, no scheduler), transformers' `generate` and logits, and `tokenizer.decode`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoints import EOS_ID

from nanovllm import LLM, SamplingParams
from nanovllm.engine import block_manager as block_manager_module
from nanovllm.models.loader import load_model

MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0, ignore_eos=True, max_tokens=MAX_TOKENS)
PARITY_KINDS = ["llama3", "qwen3_qk_norm"]


def random_prompts(lengths, seed: int = 0, vocab: int = 320) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


# 12 prompts of mixed lengths: below, at and across block boundaries (block_size 4), and one
# longer than the step's token budget (32) so that it is also prefilled in chunks.
MIXED = random_prompts([1, 3, 4, 5, 8, 9, 13, 16, 17, 24, 33, 47])


@pytest.fixture(scope="module")
def folder(checkpoint_factory):
    return lambda kind: str(checkpoint_factory(kind))


@pytest.fixture(scope="module")
def reference(folder):
    """kind -> LoadedModel, the independent single-sequence path."""
    models = {}

    def get(kind: str):
        if kind not in models:
            models[kind] = load_model(folder(kind), device="cpu", dtype="float32")
        return models[kind]

    return get


@pytest.fixture(scope="module")
def hf_model(folder):
    from transformers import AutoModelForCausalLM

    models = {}

    def get(kind: str):
        if kind not in models:
            model = AutoModelForCausalLM.from_pretrained(folder(kind), dtype=torch.float32)
            models[kind] = model.eval()
        return models[kind]

    return get


def make_llm(folder: str, **kwargs) -> LLM:
    args = dict(device="cpu", block_size=4, num_blocks=256, max_num_seqs=4)
    args.update(kwargs)
    return LLM(folder, **args)


def generate(llm: LLM, prompts, params) -> list:
    return llm.generate(prompts, params, use_tqdm=False)


def token_ids(outputs) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in outputs]


@pytest.fixture(scope="module")
def llama(folder) -> LLM:
    """One engine reused by the tests that need no special configuration."""
    return make_llm(folder("llama3"))


@pytest.fixture(scope="module")
def batched(folder):
    """kind -> outputs of MIXED generated together, 4 at a time, with a 32-token step budget."""
    runs = {}

    def get(kind: str):
        if kind not in runs:
            llm = make_llm(folder(kind), max_num_seqs=4, max_num_batched_tokens=32)
            runs[kind] = token_ids(generate(llm, MIXED, GREEDY))
        return runs[kind]

    return get


# ---- batching ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PARITY_KINDS)
def test_prompts_generated_together_equal_each_prompt_generated_alone(kind, batched, reference):
    alone = [reference(kind).greedy(prompt, MAX_TOKENS) for prompt in MIXED]
    assert batched(kind) == alone


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    input_ids = torch.tensor([prompt])
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        eos_token_id=None,
        pad_token_id=EOS_ID,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("kind", PARITY_KINDS)
def test_prompts_generated_together_equal_transformers_greedy(kind, batched, hf_model):
    expected = [hf_greedy(hf_model(kind), prompt, MAX_TOKENS) for prompt in MIXED]
    assert batched(kind) == expected


def test_outputs_do_not_degenerate_so_the_parity_tests_mean_something(batched):
    outputs = batched("llama3")
    assert len({tuple(out) for out in outputs}) == len(outputs)
    assert all(len(set(out)) > MAX_TOKENS // 3 for out in outputs)


# ---- preemption -------------------------------------------------------------------------------

CROWD = random_prompts([5, 9, 12, 14, 17, 20, 6, 11], seed=1)


def crowd_params(seeded: bool) -> list[SamplingParams]:
    if not seeded:
        return [SamplingParams(temperature=0, ignore_eos=True, max_tokens=16)] * len(CROWD)
    return [
        SamplingParams(temperature=1.0, seed=100 + i, ignore_eos=True, max_tokens=16)
        for i in range(len(CROWD))
    ]


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_preempted_sequences_give_the_same_outputs_as_with_plenty_of_blocks(folder, seeded):
    roomy = make_llm(folder("llama3"), num_blocks=256, max_num_seqs=8)
    crowded = make_llm(folder("llama3"), num_blocks=12, max_num_seqs=8)  # 48 slots for 8 seqs
    expected = token_ids(generate(roomy, CROWD, crowd_params(seeded)))
    got = token_ids(generate(crowded, CROWD, crowd_params(seeded)))
    assert roomy.engine.stats().num_preemptions == 0
    assert crowded.engine.stats().num_preemptions > 3
    assert got == expected
    assert crowded.engine.stats().num_free_blocks == 12


# ---- prefix caching ---------------------------------------------------------------------------

BS = 4
SHARED = random_prompts([3 * BS], seed=2)[0]  # exactly 3 blocks
TAIL_A, TAIL_B = [11, 12, 13], [21, 22, 23]


def test_a_shared_three_block_prefix_is_served_from_the_cache(folder, reference):
    llm = make_llm(folder("llama3"))
    generate(llm, [SHARED + TAIL_A], GREEDY)
    before = llm.engine.stats()
    second = token_ids(generate(llm, [SHARED + TAIL_B], GREEDY))[0]
    after = llm.engine.stats()
    assert after.prefix_cache_hits - before.prefix_cache_hits == 3 * BS
    assert after.prefix_cache_queries - before.prefix_cache_queries == len(SHARED + TAIL_B)

    uncached = make_llm(folder("llama3"), enable_prefix_caching=False)
    generate(uncached, [SHARED + TAIL_A], GREEDY)
    assert token_ids(generate(uncached, [SHARED + TAIL_B], GREEDY))[0] == second
    assert uncached.engine.stats().prefix_cache_hits == 0
    assert second == reference("llama3").greedy(SHARED + TAIL_B, MAX_TOKENS)


def collision_prompts() -> list[list[int]]:
    a, b, c, d = random_prompts([BS] * 4, seed=3)
    return [
        a + b + c + [5],
        d + b + c + [5],  # second and third blocks identical, first differs
        a + a + a + [5],  # one block's ids three times, each under another parent
        a + b + d + [6],  # first two blocks shared: a real hit through two collisions
        b + a + [7, 8],
        a + b + c + [5],  # the first prompt again
    ]


def test_forced_hash_collisions_never_hand_out_another_prompts_blocks(
    folder, reference, monkeypatch
):
    calls = []

    def colliding_hash(parent, token_ids):
        calls.append(token_ids)
        return 0

    monkeypatch.setattr(block_manager_module, "block_hash", colliding_hash)
    llm = make_llm(folder("llama3"))
    prompts = collision_prompts()
    one_by_one = [token_ids(generate(llm, [prompt], GREEDY))[0] for prompt in prompts]
    together = token_ids(generate(llm, prompts, GREEDY))
    expected = [reference("llama3").greedy(prompt, MAX_TOKENS) for prompt in prompts]
    assert one_by_one == expected
    assert together == expected
    assert calls, "the engine does not hash through block_manager.block_hash"
    # True matches still hit (the first prompt again: its first block; one per prompt order).
    assert llm.engine.stats().prefix_cache_hits >= BS


# ---- chunked prefill --------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [7, 8])
def test_a_prompt_longer_than_the_step_budget_is_prefilled_in_chunks(folder, reference, budget):
    prompt = random_prompts([45], seed=4)[0]
    llm = make_llm(folder("llama3"), max_num_batched_tokens=budget)
    engine = llm.engine
    engine.add_request("long", prompt, GREEDY)
    steps_to_first_token = 0
    while not engine.requests["long"].seqs[0].output_token_ids:
        engine.step()
        steps_to_first_token += 1
    assert steps_to_first_token == -(-len(prompt) // budget)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [out for out in engine.step() if out.finished]
    assert outputs[0].outputs[0].token_ids == reference("llama3").greedy(prompt, MAX_TOKENS)


def test_chunked_prefill_next_to_running_decodes_gives_the_same_outputs(folder, reference):
    prompts = [random_prompts([45], seed=4)[0], *MIXED[:3]]
    llm = make_llm(folder("llama3"), max_num_batched_tokens=6)
    expected = [reference("llama3").greedy(p, MAX_TOKENS) for p in prompts]
    assert token_ids(generate(llm, prompts, GREEDY)) == expected


# ---- n > 1 ------------------------------------------------------------------------------------

N_PROMPT = SHARED + [9]  # 3 full blocks + 1 token
N_PARAMS = SamplingParams(n=3, temperature=1.0, seed=1234, ignore_eos=True, max_tokens=MAX_TOKENS)


def n_outputs(output) -> list[list[int]]:
    return [completion.token_ids for completion in output.outputs]


def test_n_samples_share_the_prompt_blocks_and_differ(folder):
    engine = make_llm(folder("llama3")).engine
    request = engine.add_request("n3", N_PROMPT, N_PARAMS)
    tables, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out if out.finished else final
        running = [seq for seq in request.seqs if seq.block_table]
        if len(running) == 3:
            tables.append([list(seq.block_table[:3]) for seq in running])
    assert tables, "the three samples never ran together"
    assert all(t[0] == t[1] == t[2] for t in tables)
    # Each of the two siblings found the leader's three full prompt blocks in the cache.
    assert engine.stats().prefix_cache_hits == 2 * 3 * BS
    assert [c.index for c in final.outputs] == [0, 1, 2]
    samples = n_outputs(final)
    assert all(len(s) == MAX_TOKENS for s in samples)
    assert len({tuple(s) for s in samples}) == 3


def test_n_samples_with_a_seed_reproduce_across_runs_and_batch_compositions(folder):
    alone = n_outputs(generate(make_llm(folder("llama3")), [N_PROMPT], N_PARAMS)[0])
    assert len({tuple(s) for s in alone}) == 3

    neighbours = random_prompts([7, 15, 22], seed=5)
    noisy = SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=MAX_TOKENS)
    for max_num_seqs, position in [(2, 0), (4, 1), (8, 3)]:
        llm = make_llm(folder("llama3"), max_num_seqs=max_num_seqs, max_num_batched_tokens=16)
        prompts = list(neighbours)
        prompts.insert(position, N_PROMPT)
        params = [noisy] * len(neighbours)
        params.insert(position, N_PARAMS)
        outputs = generate(llm, prompts, params)
        assert n_outputs(outputs[position]) == alone, (max_num_seqs, position)
        # Again on the same engine, now with the prompt's blocks cached.
        assert n_outputs(generate(llm, [N_PROMPT], N_PARAMS)[0]) == alone


# ---- abort ------------------------------------------------------------------------------------


def test_aborting_a_running_request_frees_its_blocks_at_once(folder):
    llm = make_llm(folder("llama3"), num_blocks=32)
    engine = llm.engine
    engine.add_request("keep", MIXED[5], GREEDY)
    engine.add_request("drop", MIXED[9], SamplingParams(n=3, temperature=1.0, max_tokens=30))
    for _ in range(4):
        engine.step()
    drop = engine.requests["drop"]
    assert sum(1 for seq in drop.seqs if seq.block_table) == 3
    keep_blocks = len(engine.requests["keep"].seqs[0].block_table)
    shared = {b for seq in drop.seqs for b in seq.block_table} & set(
        engine.requests["keep"].seqs[0].block_table
    )
    assert not shared

    assert engine.abort_request("drop")
    stats = engine.stats()
    assert stats.num_free_blocks == 32 - keep_blocks
    assert all(seq.block_table == [] for seq in drop.seqs)
    assert [seq.finish_reason for seq in drop.seqs] == ["abort"] * 3
    assert stats.num_running == 1
    assert not engine.abort_request("drop"), "a second abort finds nothing"
    finished = []
    while engine.has_unfinished_requests():
        finished += [out.request_id for out in engine.step() if out.finished]
    assert finished == ["keep"]
    assert engine.stats().num_free_blocks == 32


def test_aborting_a_waiting_request_removes_it_from_the_queue(folder):
    llm = make_llm(folder("llama3"), max_num_seqs=1)
    engine = llm.engine
    engine.add_request("first", MIXED[4], GREEDY)
    engine.add_request("second", MIXED[5], GREEDY)
    engine.step()
    assert engine.stats().num_waiting == 1
    assert engine.abort_request("second")
    assert engine.stats().num_waiting == 0
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


# ---- sampling and stop rules through the engine -----------------------------------------------

TEXT_PROMPT = "The quick brown fox jumps over the lazy dog"


def test_a_seeded_request_gives_the_same_tokens_whatever_its_batch_neighbours(folder):
    params = SamplingParams(
        temperature=0.9, top_p=0.9, top_k=50, seed=7, ignore_eos=True, max_tokens=16
    )
    prompt = MIXED[6]
    alone = token_ids(generate(make_llm(folder("llama3")), [prompt], params))[0]
    for seed, count in [(11, 3), (12, 7)]:
        neighbours = random_prompts(list(range(2, 2 + 5 * count, 5)), seed=seed)
        noisy = SamplingParams(temperature=1.2, ignore_eos=True, max_tokens=20)
        llm = make_llm(folder("llama3"), max_num_seqs=count)
        outputs = generate(llm, [*neighbours, prompt], [noisy] * count + [params])
        assert outputs[-1].outputs[0].token_ids == alone


def test_unseeded_sampling_is_actually_random(llama):
    params = SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=16)
    outputs = token_ids(generate(llama, [MIXED[6]] * 4, params))
    assert len({tuple(out) for out in outputs}) > 1


def test_top_k_1_equals_greedy(llama):
    top1 = SamplingParams(temperature=1.0, top_k=1, ignore_eos=True, max_tokens=MAX_TOKENS)
    assert token_ids(generate(llama, MIXED[:6], top1)) == token_ids(
        generate(llama, MIXED[:6], GREEDY)
    )


def greedy_run(llm: LLM, prompt, max_tokens: int = 24):
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens)
    return generate(llm, [prompt], params)[0].outputs[0]


def boundary_stop_string(tokenizer, out_ids: list[int]) -> tuple[str, int, int]:
    """A 2-character string whose first character ends one output token and whose second begins
    the next, found nowhere earlier in the text; returns it, its index in the text and the
    number of tokens up to the one that completes it."""
    texts = [tokenizer.decode(out_ids[:k]) for k in range(len(out_ids) + 1)]
    full = texts[-1]
    for k in range(1, len(out_ids)):
        before, after = texts[k], texts[k + 1]
        if not before or len(after) <= len(before) or not after.startswith(before):
            continue
        candidate = before[-1] + after[len(before)]
        if "\ufffd" in candidate or not candidate.isprintable() or candidate.isspace():
            continue
        if full.find(candidate) == len(before) - 1:
            return candidate, len(before) - 1, k + 1
    raise AssertionError("no stop string spanning two tokens in this output")


@pytest.mark.parametrize("include", [False, True], ids=["excluded", "included"])
def test_a_stop_string_spanning_two_tokens_ends_the_text_right_before_it(llama, include):
    full = greedy_run(llama, TEXT_PROMPT)
    stop, index, num_tokens = boundary_stop_string(llama.tokenizer, full.token_ids)
    params = SamplingParams(
        temperature=0,
        ignore_eos=True,
        max_tokens=24,
        stop=["never appears \u2603", stop],
        include_stop_str_in_output=include,
    )
    out = generate(llama, [TEXT_PROMPT], params)[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.stop_reason == stop
    assert out.token_ids == full.token_ids[:num_tokens]
    assert out.text == full.text[: index + (len(stop) if include else 0)]


def test_stop_strings_are_found_whatever_the_batch(llama):
    full = greedy_run(llama, TEXT_PROMPT)
    stop, index, _ = boundary_stop_string(llama.tokenizer, full.token_ids)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=24, stop=[stop])
    outputs = generate(llama, [MIXED[3], TEXT_PROMPT, MIXED[8]], params)
    assert outputs[1].outputs[0].text == full.text[:index]


def first_new_token(out_ids: list[int], start: int = 1) -> int:
    """Index of the first output token at or after start that did not occur before it."""
    for i in range(start, len(out_ids)):
        if out_ids[i] not in out_ids[:i]:
            return i
    raise AssertionError("no fresh token in the greedy output")


def test_a_stop_token_id_ends_generation_and_is_reported(llama):
    full = greedy_run(llama, TEXT_PROMPT)
    i = first_new_token(full.token_ids, start=3)
    stop_id = full.token_ids[i]
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=24, stop_token_ids=[stop_id])
    out = generate(llama, [TEXT_PROMPT], params)[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.stop_reason == stop_id
    assert out.token_ids == full.token_ids[: i + 1]
    assert out.text == llama.tokenizer.decode(full.token_ids[:i])


def masked_greedy(reference, prompt, masked: set[int], min_tokens: int, stop_ids, max_tokens):
    """Greedy with `masked` ids forbidden for the first min_tokens tokens (the oracle)."""
    out: list[int] = []
    while len(out) < max_tokens:
        logits = np.array(reference.logits(prompt + out)[-1])
        if len(out) < min_tokens:
            logits[list(masked)] = -np.inf
        out.append(int(logits.argmax()))
        if out[-1] in stop_ids:
            break
    return out


def test_min_tokens_holds_back_stop_token_ids(llama, reference):
    prompt = llama.tokenizer.encode(TEXT_PROMPT)
    full = greedy_run(llama, prompt)
    i = first_new_token(full.token_ids, start=1)
    stop_id = full.token_ids[i]
    min_tokens = i + 4
    params = SamplingParams(
        temperature=0,
        ignore_eos=True,
        max_tokens=24,
        stop_token_ids=[stop_id],
        min_tokens=min_tokens,
    )
    out = generate(llama, [prompt], params)[0].outputs[0]
    assert stop_id not in out.token_ids[:min_tokens]
    assert len(out.token_ids) > min_tokens
    eos = set(llama.engine.eos_token_ids)
    expected = masked_greedy(
        reference("llama3"), prompt, eos | {stop_id}, min_tokens, {stop_id}, 24
    )
    assert out.token_ids == expected
    assert out.finish_reason == ("stop" if expected[-1] == stop_id else "length")


def test_min_tokens_holds_back_eos(llama, reference):
    prompt = llama.tokenizer.encode(TEXT_PROMPT)
    eos = set(llama.engine.eos_token_ids)
    natural = generate(llama, [prompt], SamplingParams(temperature=0, max_tokens=30))[0].outputs[0]
    assert natural.finish_reason == "stop" and natural.token_ids[-1] in eos, "fixture: EOS needed"
    min_tokens = len(natural.token_ids) + 2
    params = SamplingParams(temperature=0, max_tokens=30, min_tokens=min_tokens)
    out = generate(llama, [prompt], params)[0].outputs[0]
    assert len(out.token_ids) >= min_tokens
    assert not eos & set(out.token_ids[:min_tokens])
    assert out.token_ids == masked_greedy(reference("llama3"), prompt, eos, min_tokens, eos, 30)


def test_min_tokens_also_holds_back_stop_strings_as_in_vllm(llama):
    """vLLM (v1 detokenizer, since vllm-project/vllm#22014; V0's StopChecker always) checks stop
    strings only once more than min_tokens tokens exist, and never finds a match that lies
    wholly inside the text of the first min_tokens tokens."""
    full = greedy_run(llama, TEXT_PROMPT)
    stop, index, num_tokens = boundary_stop_string(llama.tokenizer, full.token_ids)
    assert full.text.count(stop) == 1
    min_tokens = num_tokens + 2
    params = SamplingParams(
        temperature=0, ignore_eos=True, max_tokens=24, stop=[stop], min_tokens=min_tokens
    )
    out = generate(llama, [TEXT_PROMPT], params)[0].outputs[0]
    assert out.finish_reason == "length"
    assert out.token_ids == full.token_ids


def test_max_tokens_ends_with_finish_reason_length(llama):
    outputs = generate(
        llama, MIXED[:4], SamplingParams(temperature=0, ignore_eos=True, max_tokens=5)
    )
    for out in outputs:
        assert out.finished
        assert out.outputs[0].finish_reason == "length"
        assert out.outputs[0].stop_reason is None
        assert len(out.outputs[0].token_ids) == 5


@torch.no_grad()
def hf_log_softmax(model, ids: list[int]) -> np.ndarray:
    logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


@pytest.mark.parametrize("temperature", [0.0, 0.7], ids=["greedy", "sampled"])
def test_logprobs_equal_log_softmax_of_transformers_logits(llama, hf_model, temperature):
    prompt = MIXED[7]
    params = SamplingParams(
        temperature=temperature, seed=3, ignore_eos=True, max_tokens=8, logprobs=3
    )
    out = generate(llama, [prompt], params)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 8
    expected = hf_log_softmax(hf_model("llama3"), prompt + out.token_ids)
    for j, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        row = expected[len(prompt) - 1 + j]  # raw logits: no temperature (vLLM's default)
        top3 = np.argsort(-row)[:3]
        assert [t for t, _ in entry.top] == top3.tolist()
        np.testing.assert_allclose([v for _, v in entry.top], row[top3], atol=1e-4)
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(row[token], abs=1e-4)
        assert entry.rank == int((row > row[token]).sum()) + 1


def test_final_text_equals_decoding_all_output_ids(llama):
    tokenizer = llama.tokenizer
    prompts = [MIXED[i][:n] for i in range(4, 12) for n in (2, 5)]
    for max_tokens in (5, 7, 9, 16):
        params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens)
        for out in generate(llama, prompts, params):
            completion = out.outputs[0]
            assert completion.text == tokenizer.decode(completion.token_ids), max_tokens


def test_streamed_text_deltas_add_up_to_the_decoded_output(folder):
    llm = make_llm(folder("llama3"))
    engine, tokenizer = llm.engine, llm.tokenizer
    prompts = {f"r{i}": MIXED[i] for i in range(4, 12)}
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=9)
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, params)
    deltas = {request_id: [] for request_id in prompts}
    ids = {request_id: [] for request_id in prompts}
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas[out.request_id].append(out.outputs[0].delta_text)
            ids[out.request_id] += out.outputs[0].delta_token_ids
            if out.finished:
                final[out.request_id] = out.outputs[0]
    for request_id in prompts:
        assert ids[request_id] == final[request_id].token_ids
        assert "".join(deltas[request_id]) == tokenizer.decode(final[request_id].token_ids)
        assert "".join(deltas[request_id]) == final[request_id].text
