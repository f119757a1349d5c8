"""Speculative decoding, as a specification: n-gram prompt lookup, rejection sampling that keeps
exactly the target distribution, and the engine with a draft model or n-gram proposer — greedy
parity with plain decoding at any batch size and under preemption, the target distribution end
to end, metrics, stops inside an accepted run, penalties and logprobs, seeded reproducibility,
KV blocks returned after rejections and aborts, and refusal of a draft with another vocabulary.

Expected distributions are computed here (NumPy, or the single-sequence `LoadedModel` path for
the models), never by the code under test. Chi-square p-values come from our own regularized
incomplete gamma (scipy is not a dependency), itself checked against table values.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from checkpoints import (
    BOS_ID,
    EOS_ID,
    perturbed_copy,
    randomize_weights,
    train_tokenizer,
    write_generation_config,
    write_tokenizer,
)

from nanovllm import LLM, SamplingParams
from nanovllm.backends import get_backend
from nanovllm.engine.rejection import rejection_sample
from nanovllm.engine.spec_decode import SpecStats, ngram_propose
from nanovllm.errors import NanovllmError
from nanovllm.models.loader import LoadedModel, load_checkpoint

DRAWS = 20_000
K = 3  # num_speculative_tokens of the engines below
BLOCK_SIZE = 4  # small blocks: drafts cross block boundaries and rejected slots get trimmed

# Prompts with repetition, so that n-gram lookup finds matches from the first step on.
PROMPT_TEXTS = (
    "the lazy dog sleeps, the lazy dog sleeps, the lazy",
    "Simple is better than complex. Simple is better than",
    "blocks and blocks and blocks and",
    "Readability counts. Readability counts. Readability",
)
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


# ---- statistics helpers -----------------------------------------------------------------------
def chi2_sf(stat: float, dof: int) -> float:
    """P(X >= stat), X ~ chi-square(dof): the regularized upper incomplete gamma Q(dof/2, stat/2),
    by its series below a + 1 and by Lentz's continued fraction above (Numerical Recipes 6.2)."""
    a, x = dof / 2, stat / 2
    if x <= 0:
        return 1.0
    log_prefactor = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        term = total = 1 / a
        n = a
        while term > total * 1e-16:
            n += 1
            term *= x / n
            total += term
        return max(0.0, 1 - total * math.exp(log_prefactor))
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 100_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(log_prefactor) * h


def chi_square_p(observed: np.ndarray, expected: np.ndarray) -> float:
    """Goodness of fit; cells expected below 5 are pooled into one (a valid coarser test)."""
    observed, expected = np.asarray(observed, float), np.asarray(expected, float)
    if observed[expected <= 0].any():
        return 0.0  # an impossible outcome happened
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] < 5:  # fold a still-small pool into the smallest big cell
        smallest = int(np.argmin(exp[:-1]))
        obs[smallest] += obs[-1]
        exp[smallest] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    return chi2_sf(stat, len(exp) - 1)


def counts_of(tokens, vocab: int) -> np.ndarray:
    return np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab)


def test_chi2_sf_matches_table_values_and_closed_forms():
    # Upper quantiles from standard chi-square tables.
    assert chi2_sf(3.841459, 1) == pytest.approx(0.05, rel=1e-4)
    assert chi2_sf(18.307038, 10) == pytest.approx(0.05, rel=1e-4)
    assert chi2_sf(50.892181, 30) == pytest.approx(0.01, rel=1e-4)
    assert chi2_sf(124.342113, 100) == pytest.approx(0.05, rel=1e-4)
    assert chi2_sf(149.449252, 100) == pytest.approx(0.001, rel=1e-3)
    # dof 2: Q = exp(-x/2); dof 4: Q = exp(-x/2) (1 + x/2) — deep tail and below the mean.
    for stat in (0.5, 3.0, 40.0, 80.0):
        assert chi2_sf(stat, 2) == pytest.approx(math.exp(-stat / 2), rel=1e-9)
        assert chi2_sf(stat, 4) == pytest.approx(math.exp(-stat / 2) * (1 + stat / 2), rel=1e-9)


# ---- n-gram prompt lookup ----------------------------------------------------------------------
def test_ngram_proposes_what_followed_the_latest_earlier_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 8, 1, 2, 3]
    # [1, 2, 3] also occurs at 0 (followed by 9, 1, 2); the latest occurrence is at 4.
    assert ngram_propose(tokens, k=3, n_min=3, n_max=3) == [8, 1, 2]


def test_ngram_prefers_the_longest_matching_n():
    tokens = [5, 6, 7, 1, 9, 7, 2, 5, 6, 7]
    # The 3-gram [5, 6, 7] matched at 0 (-> 1) beats the later 1-gram [7] at 5 (-> 2).
    assert ngram_propose(tokens, k=1, n_min=1, n_max=3) == [1]
    assert ngram_propose(tokens, k=1, n_min=1, n_max=1) == [2]


def test_ngram_returns_at_most_k_tokens():
    tokens = [4, 1, 2, 3, 5, 6, 4]
    assert ngram_propose(tokens, k=1, n_min=1, n_max=2) == [1]
    assert ngram_propose(tokens, k=4, n_min=1, n_max=2) == [1, 2, 3, 5]
    # A match near the end has fewer than k followers: all of them, nothing invented.
    assert ngram_propose([7, 3, 7], k=5, n_min=1, n_max=2) == [3, 7]


def test_ngram_returns_nothing_without_a_match_or_room():
    assert ngram_propose([1, 2, 3, 4], k=3, n_min=1, n_max=3) == []
    assert ngram_propose([], k=3, n_min=1, n_max=3) == []
    assert ngram_propose([5], k=3, n_min=1, n_max=3) == []
    assert ngram_propose([5, 5], k=3, n_min=2, n_max=3) == []  # too short for any 2-gram match
    # Only a 1-gram ([3]) matches; n_min=2 forbids it.
    assert ngram_propose([3, 1, 2, 3], k=3, n_min=2, n_max=3) == []
    assert ngram_propose([3, 1, 2, 3], k=3, n_min=1, n_max=3) == [1, 2, 3]


# ---- rejection sampling -----------------------------------------------------------------------
VOCAB = 8


def random_dists(rng: np.random.Generator, rows: int) -> np.ndarray:
    return rng.dirichlet(np.full(VOCAB, 0.7), size=rows).astype(np.float32)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(p.astype(float) - q).sum())


def run_rejection(
    p: np.ndarray, q: np.ndarray | None, fixed_drafts=None, seed: int = 0, draws: int = DRAWS
):
    """Verdicts of `draws` calls; drafts sampled from q's rows (or fixed: a one-hot proposer)."""
    rng, generator = np.random.default_rng(seed + 1000), np.random.default_rng(seed)
    verdicts = []
    for _ in range(draws):
        if q is None:
            drafts = list(fixed_drafts)
        else:
            drafts = [int(rng.choice(VOCAB, p=row / row.sum())) for row in q.astype(float)]
        verdicts.append(rejection_sample(p, drafts, q, generator))
    return verdicts


def test_rejection_sampling_first_token_follows_target_not_draft():
    rng = np.random.default_rng(7)
    p, q = random_dists(rng, 2), random_dists(rng, 1)
    assert total_variation(p[0], q[0]) > 0.3  # the draft really is a different distribution
    verdicts = run_rejection(p, q)
    first = counts_of([v.token_ids[0] for v in verdicts], VOCAB)
    assert chi_square_p(first, p[0] * DRAWS) > 0.001
    assert chi_square_p(first, q[0] * DRAWS) < 1e-6
    # The draft token is accepted with probability sum_x min(p(x), q(x)).
    accepted = sum(v.num_accepted for v in verdicts)
    rate = float(np.minimum(p[0], q[0]).sum())
    assert abs(accepted - rate * DRAWS) < 5 * math.sqrt(rate * (1 - rate) * DRAWS)


def test_rejection_sampling_keeps_the_target_at_every_position():
    """k = 3: the first output token follows p_0; given the first i drafts were accepted, the
    next output token (accepted draft, correction or bonus) follows p_i."""
    rng = np.random.default_rng(11)
    p, q = random_dists(rng, K + 1), random_dists(rng, K)
    # Drafts close to the target, so that enough draws reach the later positions.
    q = (0.3 * q + 0.7 * p[:K]).astype(np.float32)
    verdicts = run_rejection(p, q, seed=1)
    for i in range(K + 1):
        tokens = [v.token_ids[i] for v in verdicts if v.num_accepted >= i]
        assert len(tokens) > 3000, f"too few draws reach position {i}"
        assert chi_square_p(counts_of(tokens, VOCAB), p[i] * len(tokens)) > 0.001, i
    for v in verdicts:
        assert len(v.token_ids) == v.num_accepted + 1


def test_rejection_sampling_with_a_deterministic_proposer_follows_target():
    """draft_probs=None: the proposal is one-hot; accepted with p(x), else drawn from p minus x."""
    rng = np.random.default_rng(3)
    p = random_dists(rng, K + 1)
    drafts = [int(np.argsort(row)[-2]) for row in p[:K]]  # each row's second most likely token
    verdicts = run_rejection(p, None, fixed_drafts=drafts, seed=2)
    first = counts_of([v.token_ids[0] for v in verdicts], VOCAB)
    assert chi_square_p(first, p[0] * DRAWS) > 0.001
    accepted_first = sum(v.num_accepted >= 1 for v in verdicts)
    rate = float(p[0, drafts[0]])
    assert abs(accepted_first - rate * DRAWS) < 5 * math.sqrt(rate * (1 - rate) * DRAWS)
    second = [v.token_ids[1] for v in verdicts if v.num_accepted >= 1]
    assert chi_square_p(counts_of(second, VOCAB), p[1] * len(second)) > 0.001


def test_rejection_sampling_accepts_every_draft_when_draft_equals_target():
    rng = np.random.default_rng(5)
    p = random_dists(rng, K + 1)
    verdicts = run_rejection(p, p[:K].copy(), seed=3, draws=2000)
    assert all(v.num_accepted == K for v in verdicts)


# ---- checkpoints and engines -------------------------------------------------------------------
def build_small_model(folder: Path, seed: int, vocab_extra: int = 0) -> Path:
    """A 1-layer, hidden-32 Llama sharing the test tokenizer (vocab 320 + vocab_extra)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = train_tokenizer()
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size() + vocab_extra,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_weights(model)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(tokenizer, folder)
    write_generation_config(folder)
    return folder


@pytest.fixture(scope="module")
def target(checkpoint_factory) -> Path:
    return checkpoint_factory("llama3")


@pytest.fixture(scope="module")
def small_target(tmp_path_factory) -> Path:
    return build_small_model(tmp_path_factory.mktemp("small_target"), seed=11)


@pytest.fixture(scope="module")
def drafts(target, small_target, tmp_path_factory) -> dict[str, Path]:
    """near: the target jittered (accepts about half); far: an unrelated 1-layer model with
    another shape (accepts almost nothing); same: the target itself (accepts everything)."""
    near = perturbed_copy(target, tmp_path_factory.mktemp("near_draft"), scale=0.03, seed=5)
    return {"near": near, "far": small_target, "same": target}


@pytest.fixture(scope="module")
def make_llm(target, drafts):
    """proposer ("none", "ngram" or a key of drafts) + engine args -> an LLM, built once."""
    built: dict[tuple, LLM] = {}

    def make(proposer: str, **engine_args) -> LLM:
        engine_args = dict(block_size=BLOCK_SIZE, max_num_seqs=4) | engine_args
        key = (proposer, tuple(sorted(engine_args.items())))
        if key not in built:
            if proposer == "ngram":
                engine_args |= dict(speculative_method="ngram", num_speculative_tokens=K)
            elif proposer != "none":
                engine_args |= dict(draft_model=str(drafts[proposer]), num_speculative_tokens=K)
            built[key] = LLM(str(target), **engine_args)
        return built[key]

    return make


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    tokenizer = train_tokenizer()
    return [tokenizer.encode(text).ids for text in PROMPT_TEXTS]


@pytest.fixture(scope="module")
def baseline(make_llm, prompts) -> list[list[int]]:
    """Greedy tokens of each prompt without speculation."""
    outputs = make_llm("none").generate(prompts, GREEDY, use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]


def spec_delta(before: SpecStats, after: SpecStats) -> SpecStats:
    return SpecStats(
        after.k,
        after.num_drafts - before.num_drafts,
        after.num_draft_tokens - before.num_draft_tokens,
        after.num_accepted_tokens - before.num_accepted_tokens,
        [a - b for a, b in zip(after.accepted_per_pos, before.accepted_per_pos, strict=True)],
    )


def generate_counting(llm: LLM, prompts, params):
    """Outputs, plus the speculative counters and preemptions of this call alone."""
    before = llm.engine.stats()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    after = llm.engine.stats()
    preemptions = after.num_preemptions - before.num_preemptions
    return outputs, spec_delta(before.spec, after.spec), preemptions


def token_ids(outputs) -> list[list[int]]:
    return [list(out.outputs[0].token_ids) for out in outputs]


# ---- greedy parity -----------------------------------------------------------------------------
LAYOUTS = {
    "one_seq": dict(max_num_seqs=1),
    "four_seqs": dict(max_num_seqs=4),
    # 16 blocks of 4 tokens for four requests of 36 to 64 tokens each: preemption is certain.
    "preempting": dict(max_num_seqs=4, num_blocks=16),
}


def expected_greedy_spec_stats(prompts, outputs, propose) -> SpecStats:
    """The counters a correct engine reports for greedy requests of max_tokens len(output):
    token 1 from the prefill; then each step drafts min(k, tokens left - 1) tokens, keeps the
    drafts that match the target's greedy output and appends one more. propose(context, n) is
    the proposer's guess, computed outside the engine (for a draft model, its single-sequence
    greedy path, so stale or misplaced draft KV in the engine shows up as other counts)."""
    stats = SpecStats(K)
    for prompt, output in zip(prompts, outputs, strict=True):
        done = 1
        while done < len(output):
            drafts = propose(prompt + output[:done], min(K, len(output) - done - 1))
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == output[done + accepted]:
                accepted += 1
            stats.record(len(drafts), accepted)
            done += accepted + 1
    return stats


@pytest.fixture(scope="module")
def proposers(drafts):
    """proposer name -> propose(context, n) computed outside the engine."""
    backend = get_backend("cpu")
    models = {
        name: LoadedModel(load_checkpoint(str(path)), backend, 128) for name, path in drafts.items()
    }
    table = {
        name: (lambda ids, n, m=m: m.greedy(ids, n) if n else []) for name, m in models.items()
    }
    table["ngram"] = lambda ids, n: ngram_propose(ids, n, 1, 4) if n else []
    return table


def record_proposals(llm: LLM, monkeypatch) -> list[tuple[list[int], int, list[int]]]:
    """Log (context, prompt length, guess) of every proposal the engine verifies."""
    spec, log = llm.engine.runner.proposer, []
    propose = spec.propose

    def recording(wanted):
        proposals = propose(wanted)
        for seq, proposal in proposals.items():
            log.append((list(seq.token_ids), seq.num_prompt_tokens, list(proposal.token_ids)))
        return proposals

    monkeypatch.setattr(spec, "propose", recording)
    return log


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("proposer", ["near", "far", "ngram"])
def test_greedy_output_with_speculation_equals_greedy_without(
    make_llm, prompts, baseline, proposers, proposer, layout, monkeypatch
):
    llm = make_llm(proposer, **LAYOUTS[layout])
    proposed = record_proposals(llm, monkeypatch)
    outputs, spec, preemptions = generate_counting(llm, prompts, GREEDY)
    assert token_ids(outputs) == baseline
    assert spec.num_drafts > 0
    # Every guess is the proposer's own for that context (no stale draft KV after a rejection
    # or a preemption), as long as the lookahead allows (max_tokens).
    for context, num_prompt, guess in proposed:
        assert guess == proposers[proposer](context, len(guess))
        if proposer != "ngram":
            assert len(guess) == min(K, GREEDY.max_tokens - (len(context) - num_prompt) - 1)
    if layout != "preempting":  # a recomputed sequence's first step is a plain one
        assert spec == expected_greedy_spec_stats(prompts, baseline, proposers[proposer])
    if proposer != "ngram":
        assert spec.num_accepted_tokens < spec.num_draft_tokens  # rejections did happen
    if proposer == "near":
        assert spec.num_accepted_tokens > 0  # and so did acceptances
    if layout == "preempting":
        assert preemptions > 0


def test_draft_identical_to_target_accepts_every_greedy_draft(make_llm, prompts, baseline):
    outputs, spec, _ = generate_counting(make_llm("same"), prompts, GREEDY)
    assert token_ids(outputs) == baseline
    # Per request: the prefill gives token 1; five steps of k=3 accepted drafts + 1 bonus give
    # tokens 2..21; the last step may add only 3 more (max_tokens 24), so it drafts 2.
    n = len(prompts)
    assert spec.num_drafts == 6 * n
    assert spec.num_draft_tokens == (5 * K + 2) * n
    assert spec.num_accepted_tokens == spec.num_draft_tokens
    assert spec.accepted_per_pos == [6 * n, 6 * n, 5 * n]
    assert spec.acceptance_rate == 1.0
    assert spec.mean_acceptance_length == pytest.approx(1 + 17 / 6)


@pytest.mark.parametrize("proposer", ["near", "same"])
def test_speculation_metrics_are_consistent(make_llm, prompts, proposer):
    llm = make_llm(proposer)
    llm.generate(prompts, GREEDY, use_tqdm=False)
    spec = llm.engine.stats().spec
    assert spec.k == K and len(spec.accepted_per_pos) == K
    assert 0 < spec.num_drafts <= spec.num_draft_tokens <= K * spec.num_drafts
    assert spec.num_accepted_tokens <= spec.num_draft_tokens
    assert sum(spec.accepted_per_pos) == spec.num_accepted_tokens
    per_pos = spec.accepted_per_pos
    assert all(per_pos[i] >= per_pos[i + 1] for i in range(K - 1))
    assert spec.accepted_per_pos[0] <= spec.num_drafts
    assert spec.acceptance_rate == spec.num_accepted_tokens / spec.num_draft_tokens
    assert spec.mean_acceptance_length == 1 + spec.num_accepted_tokens / spec.num_drafts
    assert make_llm("none").engine.stats().spec is None


# ---- the distribution, end to end --------------------------------------------------------------
def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def continuation_cells(models: list[LoadedModel], prefix: list[int], total: int) -> dict:
    """{continuation: probability} for every continuation (token i drawn from models[i]) whose
    expected count among `total` draws is at least 5. A prefix below 5 has no such descendant."""
    cells: dict[tuple[int, ...], float] = {(): 1.0}
    for model in models:
        grown = {}
        for context, prob in cells.items():
            dist = softmax(model.logits(prefix + list(context))[-1])
            for token in np.flatnonzero(prob * dist * total >= 5):
                grown[(*context, int(token))] = prob * float(dist[token])
        cells = grown
    return cells


def joint_p_value(samples: list[tuple[int, ...]], cells: dict) -> float:
    """Chi-square of sampled continuations against `cells`, all others pooled in one cell."""
    counts, total = Counter(samples), len(samples)
    observed = [counts[c] for c in cells]
    expected = [p * total for p in cells.values()]
    observed.append(total - sum(observed))
    expected.append(total - sum(expected))
    return chi_square_p(np.array(observed), np.array(expected))


def test_engine_samples_verified_tokens_from_the_target_distribution(small_target, tmp_path):
    """20,000 requests end to end (temperature 1, no seed): prompt [BOS], three tokens each.
    Token 1 comes from the prefill; token 2 is the first verified one (the draft's guess,
    accepted, or the correction drawn from the residual); token 3 is the bonus after an
    acceptance or a plain decode after a rejection. The joint law of (1, 2) and of (1, 2, 3)
    must be the target's, computed independently by LoadedModel's single-sequence path."""
    draft = perturbed_copy(small_target, tmp_path / "draft", scale=0.15, seed=9)
    llm = LLM(
        str(small_target),
        draft_model=str(draft),
        num_speculative_tokens=1,
        max_num_seqs=512,
        max_num_batched_tokens=4096,
        num_blocks=1024,
    )
    params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True)
    outputs = llm.generate([[BOS_ID]] * DRAWS, params, use_tqdm=False)
    samples = [tuple(out.outputs[0].token_ids) for out in outputs]
    assert all(len(s) == 3 for s in samples)
    spec = llm.engine.stats().spec
    assert spec.num_drafts == DRAWS  # one draft per request: at token 2 (max_tokens caps k)
    assert 0.2 < spec.acceptance_rate < 0.8  # both the accept and the residual path carry weight

    backend = get_backend("cpu")
    oracle = LoadedModel(load_checkpoint(str(small_target)), backend, 8)
    draft_oracle = LoadedModel(load_checkpoint(str(draft)), backend, 8)
    pairs = [s[:2] for s in samples]
    assert joint_p_value(pairs, continuation_cells([oracle] * 2, [BOS_ID], DRAWS)) > 0.001
    assert joint_p_value(samples, continuation_cells([oracle] * 3, [BOS_ID], DRAWS)) > 0.001
    # Power: had every draft been accepted, token 2 would follow the draft; that is detectable.
    as_if_accepted = continuation_cells([oracle, draft_oracle], [BOS_ID], DRAWS)
    assert joint_p_value(pairs, as_if_accepted) < 1e-6


# ---- stop rules inside an accepted run ---------------------------------------------------------
def mid_run(index: int) -> bool:
    """With every draft accepted (draft == target, k=3), output token 0 comes from the prefill
    and each step appends 4: indices 1-4, 5-8, ... Is `index` before the end of its run?"""
    return index >= 1 and (index - 1) % (K + 1) != K


def first_new_token_index(tokens: list[int]) -> int:
    return next(i for i in range(2, len(tokens)) if mid_run(i) and tokens[i] not in tokens[:i])


def stop_string_at(tokens: list[int], tokenizer) -> tuple[str, int]:
    """A string that first appears in the decoded output with token i, i mid-run. (Random
    models emit stray bytes, so the text holds U+FFFD; the piece itself must not.)"""
    for i in range(2, len(tokens)):
        before, after = tokenizer.decode(tokens[:i]), tokenizer.decode(tokens[: i + 1])
        piece = after[len(before) :].strip()
        clean = after.startswith(before) and piece and "\ufffd" not in piece
        if mid_run(i) and clean and after.find(piece) == len(after) - len(piece):
            return piece, i
    raise AssertionError("no usable stop string in the greedy output")


def test_stops_inside_an_accepted_run_truncate_as_without_speculation(make_llm, prompts, baseline):
    plain, spec_llm = make_llm("none"), make_llm("same")
    prompt, full = prompts[0], baseline[0]
    stop_index = first_new_token_index(full)
    stop_str, str_index = stop_string_at(full, plain.tokenizer)
    cases = [
        GREEDY.clone(stop_token_ids=[full[stop_index]]),
        GREEDY.clone(stop=[stop_str]),
        GREEDY.clone(stop=[stop_str], include_stop_str_in_output=True),
        GREEDY.clone(max_tokens=3),  # 1 + a run of 2
        GREEDY.clone(max_tokens=7),  # 1 + 4 + a run of 2
        GREEDY.clone(ignore_eos=False, stop_token_ids=[full[stop_index]], max_tokens=8),
    ]
    expected = plain.generate([prompt] * len(cases), cases, use_tqdm=False)
    got, spec, _ = generate_counting(spec_llm, [prompt] * len(cases), cases)
    assert spec.num_accepted_tokens == spec.num_draft_tokens > 0  # all in accepted runs
    for want, have in zip(expected, got, strict=True):
        want, have = want.outputs[0], have.outputs[0]
        assert list(have.token_ids) == list(want.token_ids)
        assert have.text == want.text
        assert (have.finish_reason, have.stop_reason) == (want.finish_reason, want.stop_reason)
    # The cases really stop where intended (else this test would prove little).
    by_token, by_string, by_string_kept = (e.outputs[0] for e in expected[:3])
    assert list(by_token.token_ids) == full[: stop_index + 1]
    assert (by_token.finish_reason, by_token.stop_reason) == ("stop", full[stop_index])
    assert len(by_string.token_ids) == str_index + 1
    assert (by_string.finish_reason, by_string.stop_reason) == ("stop", stop_str)
    assert by_string_kept.text.endswith(stop_str) and not by_string.text.endswith(stop_str)
    assert [len(e.outputs[0].token_ids) for e in expected[3:5]] == [3, 7]


# ---- penalties, min_tokens and logprobs --------------------------------------------------------
def penalty_cases(full: list[int]) -> list[SamplingParams]:
    base = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)
    # min_tokens holds back a stop id the greedy output reaches at index j < 6.
    j = next(i for i in range(1, len(full)) if full[i] not in full[:i])
    return [
        base.clone(repetition_penalty=1.8),
        base.clone(presence_penalty=2.0),
        base.clone(frequency_penalty=1.5),
        base.clone(presence_penalty=-1.0, frequency_penalty=0.7, repetition_penalty=1.3),
        base.clone(min_tokens=6, stop_token_ids=[full[j]], ignore_eos=False),
    ]


@pytest.mark.parametrize("proposer", ["same", "near", "ngram"])
def test_penalties_min_tokens_and_logprobs_match_plain_decoding(
    make_llm, prompts, baseline, proposer
):
    # Prompt 2 loops greedily (one token over and over): the penalties bite.
    cases, prompt, full = penalty_cases(baseline[2]), prompts[2], baseline[2]
    expected = make_llm("none").generate([prompt] * len(cases), cases, use_tqdm=False)
    got, spec, _ = generate_counting(make_llm(proposer), [prompt] * len(cases), cases)
    assert spec.num_drafts > 0
    for case, want, have in zip(cases, expected, got, strict=True):
        want, have = want.outputs[0], have.outputs[0]
        assert list(want.token_ids) != full[: len(want.token_ids)], case  # the case matters
        assert list(have.token_ids) == list(want.token_ids), case
        assert (have.finish_reason, have.stop_reason) == (want.finish_reason, want.stop_reason)
        assert len(have.logprobs) == len(want.logprobs) == len(want.token_ids)
        # float32 noise: measured against a float64 transformers run, both paths are off by up
        # to ~1.7e-5 on logprobs near -3.5 (verification runs k+1 queries through the multi-query
        # attention path, plain decoding one); so 1e-5 absolute plus 1e-5 relative.
        for a, b in zip(have.logprobs, want.logprobs, strict=True):
            assert (a.token_id, a.rank) == (b.token_id, b.rank)
            assert a.logprob == pytest.approx(b.logprob, rel=1e-5, abs=1e-5)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            top_have, top_want = [v for _, v in a.top], [v for _, v in b.top]
            np.testing.assert_allclose(top_have, top_want, rtol=1e-5, atol=1e-5)
    min_tokens_out = expected[-1].outputs[0]
    assert len(min_tokens_out.token_ids) >= 6


# ---- seeded sampling ---------------------------------------------------------------------------
@pytest.mark.parametrize("proposer", ["near", "ngram"])
def test_seeded_sampling_with_speculation_reproduces(make_llm, prompts, proposer):
    llm = make_llm(proposer)
    seeded = [
        SamplingParams(temperature=1.0, seed=s, max_tokens=16, ignore_eos=True) for s in (1, 2, 3)
    ]
    first, spec, _ = generate_counting(llm, [prompts[0]] * 3, seeded)
    again = llm.generate([prompts[0]] * 3, seeded, use_tqdm=False)
    # Alone, and behind unseeded requests that draw from the shared generators.
    unseeded = SamplingParams(temperature=1.0, max_tokens=12)
    mixed = llm.generate(
        [prompts[2], prompts[0], prompts[3]], [unseeded, seeded[1], unseeded], use_tqdm=False
    )
    alone = llm.generate([prompts[0]], seeded[2], use_tqdm=False)
    texts = [out.outputs[0].text for out in first]
    assert spec.num_drafts > 0
    assert [out.outputs[0].text for out in again] == texts
    assert token_ids(again) == token_ids(first)
    assert mixed[1].outputs[0].token_ids == first[1].outputs[0].token_ids
    assert alone[0].outputs[0].token_ids == first[2].outputs[0].token_ids
    assert len(set(texts)) == 3  # the seeds matter


# ---- block accounting --------------------------------------------------------------------------
def assert_blocks_accounted(engine) -> None:
    """Each block's ref count is the number of live block tables holding it; free iff zero;
    no running sequence keeps slots beyond its tokens (rejected drafts' slots are returned)."""
    manager, scheduler = engine.block_manager, engine.scheduler
    holders = Counter(
        b for seq in [*scheduler.running, *scheduler.waiting] for b in seq.block_table
    )
    for block in manager.blocks:
        assert block.ref_count == holders[block.block_id], block
        assert (block.block_id in manager.free) == (block.ref_count == 0), block
    for seq in scheduler.running:
        assert len(seq.block_table) <= manager.blocks_needed(seq.num_tokens)


@pytest.mark.parametrize("proposer", ["near", "far", "ngram"])
def test_blocks_all_return_after_rejections_preemptions_and_aborts(make_llm, prompts, proposer):
    llm = make_llm(proposer, max_num_seqs=4, num_blocks=24)
    engine = llm.engine
    before = engine.stats()
    greedy = SamplingParams(temperature=0.0, max_tokens=28, ignore_eos=True)
    sampled = SamplingParams(temperature=1.0, max_tokens=20, seed=4)
    workload = [
        (prompts[0], greedy),
        (prompts[1], sampled),
        (prompts[2], greedy.clone(max_tokens=30)),
        (prompts[0], sampled.clone(n=2, seed=None)),  # shares prefix blocks with request 0
        (prompts[3], greedy),
        (prompts[1], greedy.clone(stop=["e"])),
        (prompts[2], sampled.clone(max_tokens=8)),
        (prompts[3], sampled.clone(max_tokens=24)),
    ]
    ids = [f"{proposer}-{i}" for i in range(len(workload))]
    for request_id, (prompt, params) in zip(ids, workload, strict=True):
        engine.add_request(request_id, prompt, params)
    assert engine.abort_request(ids[6])  # before it was ever scheduled
    aborts = {3: [ids[1], ids[5]], 9: [ids[2], ids[3]]}
    aborted_states, max_ref_count = set(), 0
    for step in range(1, 400):
        engine.step()
        for request_id in aborts.get(step, []):
            seqs = engine.requests[request_id].seqs
            aborted_states |= {(s.status.name, bool(s.block_table)) for s in seqs}
            assert engine.abort_request(request_id)
        assert_blocks_accounted(engine)
        max_ref_count = max(max_ref_count, *(b.ref_count for b in engine.block_manager.blocks))
        if not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests()
    # Aborts hit sequences mid-way holding blocks and queued ones; prompts shared blocks.
    assert {("RUNNING", True), ("WAITING", False)} <= aborted_states
    assert max_ref_count > 1
    after = engine.stats()
    assert after.num_free_blocks == after.num_blocks == 24
    assert all(block.ref_count == 0 for block in engine.block_manager.blocks)
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert after.num_preemptions > before.num_preemptions
    spec = spec_delta(before.spec, after.spec)
    assert spec.num_drafts > 0 and spec.num_accepted_tokens < spec.num_draft_tokens


# ---- configuration -----------------------------------------------------------------------------
def test_draft_with_another_vocabulary_is_refused(target, tmp_path):
    draft = build_small_model(tmp_path / "wide_draft", seed=12, vocab_extra=32)
    with pytest.raises(NanovllmError) as error:
        LLM(str(target), draft_model=str(draft))
    message = str(error.value)
    assert "352" in message and "320" in message and "vocabulary" in message
