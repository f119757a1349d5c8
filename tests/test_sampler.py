"""The sampler: penalties, min_tokens, greedy, temperature/min_p/top_k/top_p distributions,
seeded reproducibility inside any batch, and raw-logit logprobs.

Expected values are computed here independently (by hand or with plain NumPy), never by
calling the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from nanovllm.engine.sampler import Sampler, SamplingRow
from nanovllm.sampling_params import SamplingParams

TINY_LOGITS = np.array([2.0, 1.2, 0.8, 0.1, -0.5, -1.5], dtype=np.float32)
DRAWS = 20_000


def row(params=None, prompt=(), output=(), generator=None, eos=()) -> SamplingRow:
    return SamplingRow(params or SamplingParams(), list(prompt), list(output), generator, list(eos))


def softmax(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def chi2_sf(stat: float, dof: int) -> float:
    """P(X >= stat) for X ~ chi-square(dof), by the closed forms for integer dof."""
    y = stat / 2
    if dof % 2 == 0:
        term = total = 1.0
        for i in range(1, dof // 2):
            term *= y / i
            total += term
        return math.exp(-y) * total
    total = math.erfc(math.sqrt(y))
    term = math.sqrt(y) / math.gamma(1.5)
    for i in range(dof // 2):
        total += math.exp(-y) * term
        term *= y / (i + 1.5)
    return total


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Goodness-of-fit p-value of counts against probs; 0 if a zero-probability token appeared."""
    support = probs > 0
    if counts[~support].any():
        return 0.0
    expected = probs[support] * counts.sum()
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    return chi2_sf(stat, int(support.sum()) - 1)


def draw_counts(params: SamplingParams, logits=TINY_LOGITS, seed: int = 0) -> np.ndarray:
    rows = [row(params) for _ in range(DRAWS)]
    out = Sampler(seed=seed)(np.tile(logits, (DRAWS, 1)), rows)
    return np.bincount(out.token_ids, minlength=len(logits))


def truncate(p: np.ndarray, keep: np.ndarray) -> np.ndarray:
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """The smallest most-likely set with mass >= top_p, renormalised (reference by full sort)."""
    order = np.argsort(-p, kind="stable")
    size = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1
    keep = np.zeros(len(p), dtype=bool)
    keep[order[:size]] = True
    return truncate(p, keep)


def top_k_keep(p: np.ndarray, k: int) -> np.ndarray:
    return p >= np.sort(p)[-k]


# --- the chi-square helper itself (the distribution tests rest on it) ---


@pytest.mark.parametrize(
    ("stat", "dof"), [(3.841459, 1), (5.991465, 2), (7.814728, 3), (9.487729, 4), (11.070498, 5)]
)
def test_chi2_sf_matches_the_tabulated_5_percent_critical_values(stat, dof):
    assert chi2_sf(stat, dof) == pytest.approx(0.05, rel=1e-5)


# --- distributions (20,000 draws over 6 tokens) ---


def test_temperature_follows_softmax_of_scaled_logits():
    counts = draw_counts(SamplingParams(temperature=0.7))
    assert chi_square_p(counts, softmax(TINY_LOGITS / 0.7)) > 1e-3
    assert chi_square_p(counts, softmax(TINY_LOGITS)) < 1e-6


def test_top_p_follows_the_renormalised_nucleus_and_never_leaves_it():
    counts = draw_counts(SamplingParams(top_p=0.8))
    p = softmax(TINY_LOGITS)  # cumulative .50, .72, .87: the nucleus is the best 3 tokens
    assert counts[3:].sum() == 0
    assert chi_square_p(counts, truncate(p, np.arange(6) < 3)) > 1e-3
    assert chi_square_p(counts, p) < 1e-6


def test_top_k_follows_the_renormalised_k_best():
    counts = draw_counts(SamplingParams(top_k=2))
    p = softmax(TINY_LOGITS)
    assert counts[2:].sum() == 0
    assert chi_square_p(counts, truncate(p, np.arange(6) < 2)) > 1e-3
    assert chi_square_p(counts, p) < 1e-6


def test_min_p_drops_tokens_below_min_p_times_the_best_probability():
    counts = draw_counts(SamplingParams(min_p=0.1))
    p = softmax(TINY_LOGITS)  # .074 >= 0.1 * .497 > .041: the best 4 survive
    assert counts[4:].sum() == 0
    assert chi_square_p(counts, truncate(p, p >= 0.1 * p.max())) > 1e-3
    assert chi_square_p(counts, p) < 1e-6


def test_temperature_min_p_top_k_top_p_apply_in_vllm_order():
    params = SamplingParams(temperature=1.5, min_p=0.12, top_k=4, top_p=0.65)
    p = softmax(TINY_LOGITS / 1.5)
    p = truncate(p, p >= 0.12 * p.max())  # min_p drops the last token
    p = truncate(p, top_k_keep(p, 4))  # top_k keeps 4 of the remaining 5
    # top_p on the renormalised 4 keeps 2 (.43 + .25 >= .65); on unrenormalised mass it would be 3.
    expected = nucleus(p, 0.65)
    assert (expected > 0).sum() == 2
    counts = draw_counts(params)
    assert chi_square_p(counts, expected) > 1e-3
    assert chi_square_p(counts, softmax(TINY_LOGITS / 1.5)) < 1e-6


def test_top_p_nucleus_is_exact_whether_or_not_it_fits_in_the_presorted_candidates():
    rng = np.random.default_rng(3)
    vocab = 5000  # the flat row's 0.9 nucleus needs ~4500 tokens: more than are presorted
    peaked = rng.standard_normal(vocab) * 4
    flat = rng.standard_normal(vocab) * 0.1
    logits = np.stack([peaked, flat]).astype(np.float32)
    rows = [row(SamplingParams(top_p=0.9)), row(SamplingParams(top_p=0.9))]
    probs = Sampler().probs(logits, rows)
    for got, raw in zip(probs, logits, strict=True):
        expected = nucleus(softmax(raw), 0.9)
        assert np.array_equal(got > 0, expected > 0)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-9)
    assert (probs[1] > 0).sum() > 4000


def reference_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    p = softmax(logits / params.temperature)
    if params.min_p > 0:
        p = truncate(p, p >= params.min_p * p.max())
    if params.effective_top_k:
        p = truncate(p, top_k_keep(p, params.effective_top_k))
    return nucleus(p, params.top_p) if params.top_p < 1 else p


def test_each_row_of_a_mixed_batch_gets_its_own_truncation():
    logits = np.random.default_rng(8).standard_normal((7, 100)).astype(np.float32) * 2
    params = [
        SamplingParams(top_k=2),
        SamplingParams(top_k=50, top_p=0.5),  # top_p binds inside the 50
        SamplingParams(top_k=3, top_p=0.99),  # top_k binds
        SamplingParams(temperature=0.5, top_p=0.7),
        SamplingParams(temperature=2.0, min_p=0.3, top_k=20),
        SamplingParams(min_p=0.05, top_p=0.6),  # top_p renormalised over min_p's survivors
        SamplingParams(top_k=-1),
    ]
    probs = Sampler().probs(logits, [row(p) for p in params])
    for got, raw, p in zip(probs, logits, params, strict=True):
        expected = reference_probs(raw, p)
        assert np.array_equal(got > 0, expected > 0), p
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-9)


class FixedUniform:
    """Stands in for a row's generator: always returns the same uniform."""

    def __init__(self, u: float) -> None:
        self.u = u

    def random(self) -> float:
        return self.u


def test_draws_at_the_ends_of_the_unit_interval_never_pick_a_zero_probability_token():
    probs = np.tile(np.array([0.0, 0.5, 0.0, 0.5, 0.0], dtype=np.float32), (2, 1))
    rows = [row(generator=FixedUniform(0.0)), row(generator=FixedUniform(1 - 2**-53))]
    assert list(Sampler().sample_from_probs(probs, rows)) == [1, 3]


# --- greedy ---


def test_top_k_1_picks_the_same_tokens_as_greedy():
    logits = np.random.default_rng(1).standard_normal((16, 1000)).astype(np.float32)
    sampler = Sampler()
    sampled = sampler(logits, [row(SamplingParams(top_k=1)) for _ in range(16)]).token_ids
    greedy = sampler(logits, [row(SamplingParams(temperature=0)) for _ in range(16)]).token_ids
    assert list(sampled) == list(greedy) == list(logits.argmax(axis=1))


def test_temperature_0_takes_the_argmax_after_penalties():
    logits = np.array([1.0, 3.0, 2.5, -1.0, 0.0], dtype=np.float32)
    negative = np.array([-1.0, -2.0, -1.5, -3.0, -4.0], dtype=np.float32)
    cases = [  # (params, prompt, output, logits, expected token)
        (SamplingParams(temperature=0), [], [1], logits, 1),
        (SamplingParams(temperature=0, frequency_penalty=1.0), [], [1], logits, 2),  # 3-1 < 2.5
        (SamplingParams(temperature=0, frequency_penalty=0.3), [], [1, 1], logits, 2),  # 2.4
        (SamplingParams(temperature=0, frequency_penalty=0.3), [], [1], logits, 1),  # 2.7
        (SamplingParams(temperature=0, presence_penalty=0.6), [], [1, 1], logits, 2),  # 2.4
        (SamplingParams(temperature=0, repetition_penalty=2.0), [1], [], logits, 2),  # 3/2
        (SamplingParams(temperature=0, repetition_penalty=2.0), [0], [], negative, 2),  # -1*2
    ]
    rows = [row(params, prompt, output) for params, prompt, output, _, _ in cases]
    batch = np.stack([case[3] for case in cases])
    out = Sampler()(batch, rows)
    assert list(out.token_ids) == [case[4] for case in cases]


# --- penalties, checked through the distribution they produce ---

PENALTY_LOGITS = np.array([2.0, -1.0, 0.5, 3.0, -0.5, 1.0], dtype=np.float32)


@pytest.mark.parametrize(
    ("params", "expected_logits"),
    [
        # prompt [0, 1], output [3, 3, 4]; hand-computed
        (SamplingParams(repetition_penalty=2.0), [1.0, -2.0, 0.5, 1.5, -1.0, 1.0]),
        (SamplingParams(frequency_penalty=0.5), [2.0, -1.0, 0.5, 2.0, -1.0, 1.0]),
        (SamplingParams(presence_penalty=0.25), [2.0, -1.0, 0.5, 2.75, -0.75, 1.0]),
        (
            SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
            [1.0, -2.0, 0.5, 0.25, -1.75, 1.0],  # repetition first, then 1.5 - 1 - .25
        ),
    ],
)
def test_penalties_change_logits_as_vllm_does(params, expected_logits):
    plain = row(SamplingParams(), prompt=[3, 4], output=[3, 3, 4])
    penalized = row(params, prompt=[0, 1], output=[3, 3, 4])
    logits = np.stack([PENALTY_LOGITS, PENALTY_LOGITS])
    probs = Sampler().probs(logits, [plain, penalized])
    np.testing.assert_allclose(probs[0], softmax(PENALTY_LOGITS), rtol=1e-5)
    np.testing.assert_allclose(probs[1], softmax(expected_logits), rtol=1e-5)
    assert np.array_equal(logits[1], PENALTY_LOGITS)  # the caller's logits are left alone


# --- min_tokens ---


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = np.tile(np.array([0.0, 1.0, 0.5, 2.0, 4.0, 5.0], dtype=np.float32), (6, 1))
    greedy = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[4])
    sampled = greedy.clone(temperature=1.0)
    rows = [
        row(greedy, output=[0, 1], eos=[5]),  # 2 < 3: EOS (5) and the stop id (4) masked
        row(greedy, output=[0, 1, 2], eos=[5]),  # reached: nothing masked
        row(greedy.clone(ignore_eos=True), output=[0, 1], eos=[5]),  # vLLM masks EOS anyway
        row(SamplingParams(temperature=0), output=[], eos=[5]),  # no min_tokens
        row(sampled, output=[0], eos=[5]),
        row(sampled, output=[0, 1, 2], eos=[5]),
    ]
    assert list(Sampler()(logits, rows).token_ids[:4]) == [3, 5, 3, 5]
    probs = Sampler().probs(logits, rows)
    assert probs[4, 4] == 0 and probs[4, 5] == 0
    np.testing.assert_allclose(probs[4, :4], softmax(logits[4, :4]), rtol=1e-5)
    np.testing.assert_allclose(probs[5], softmax(logits[5]), rtol=1e-5)


# --- seeds ---


def test_seeded_row_gives_the_same_tokens_alone_and_in_any_batch():
    vocab, steps, seed = 300, 12, 1234
    step_logits = np.random.default_rng(5).standard_normal((steps, vocab)).astype(np.float32)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=seed)
    neighbours = [
        SamplingParams(),
        SamplingParams(temperature=0),
        SamplingParams(top_k=5, seed=99),
        SamplingParams(min_p=0.05, repetition_penalty=1.3),
    ]

    def run(batch: list[SamplingParams], position: int, shared_seed: int) -> list[int]:
        sampler = Sampler(seed=shared_seed)
        mine = np.random.default_rng(seed)  # the request keeps its generator across steps
        theirs = [np.random.default_rng(p.seed) if p.seed is not None else None for p in batch]
        noise = np.random.default_rng(shared_seed)
        tokens: list[int] = []
        for step in range(steps):
            rows = [row(p, [1, 2], tokens, g) for p, g in zip(batch, theirs, strict=True)]
            rows.insert(position, row(params, [1, 2], tokens, mine))
            logits = noise.standard_normal((len(rows), vocab)).astype(np.float32)
            logits[position] = step_logits[step]
            tokens.append(int(sampler(logits, rows).token_ids[position]))
        return tokens

    alone = run([], 0, shared_seed=0)
    assert run(neighbours, 0, shared_seed=1) == alone
    assert run(neighbours, 2, shared_seed=2) == alone
    assert run(neighbours[::-1][:3], 3, shared_seed=3) == alone
    assert len(set(alone)) > 6  # it really samples


def test_sample_from_probs_draws_one_uniform_per_row_by_inverse_cdf():
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(700), size=3).astype(np.float32)
    seeds = [7, 8, 9]
    rows = [row(SamplingParams(seed=s), generator=np.random.default_rng(s)) for s in seeds]
    got = Sampler().sample_from_probs(probs, rows)
    for i, s in enumerate(seeds):
        reference = np.random.default_rng(s)
        cdf = np.cumsum(probs[i].astype(np.float64))
        assert got[i] == np.searchsorted(cdf, reference.random() * cdf[-1], side="right")
        assert rows[i].generator.random() == reference.random()  # exactly one draw was used


def test_probs_is_one_hot_for_greedy_rows_and_sums_to_one():
    logits = np.random.default_rng(4).standard_normal((3, 50)).astype(np.float32)
    rows = [row(SamplingParams(temperature=0)), row(SamplingParams(top_k=7)), row()]
    probs = Sampler().probs(logits, rows)
    assert probs[0, logits[0].argmax()] == 1.0 and probs[0].sum() == 1.0
    assert (probs[1] > 0).sum() == 7
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)


# --- logprobs ---


def log_softmax(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return z - z.max() - np.log(np.exp(z - z.max()).sum())


def test_logprobs_come_from_raw_logits_with_rank_and_sorted_top_n():
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((4, 40)).astype(np.float32) * 2
    best, second = np.argsort(-logits[3])[:2]
    rows = [
        row(SamplingParams(temperature=0.5, repetition_penalty=1.3, logprobs=5), prompt=[1, 2]),
        row(SamplingParams()),
        row(SamplingParams(logprobs=0)),
        # The penalty pushes the raw best below the raw second: the chosen token has rank 2.
        row(SamplingParams(temperature=0, frequency_penalty=2.0, logprobs=3), output=[best] * 3),
    ]
    out = Sampler()(logits, rows)
    assert out.logprobs[1] is None
    assert out.token_ids[3] == second
    for i in (0, 2, 3):
        ref = log_softmax(logits[i])
        lp = out.logprobs[i]
        token = out.token_ids[i]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(ref[token], abs=1e-5)
        assert lp.rank == 1 + int((ref > ref[token]).sum())
        k = rows[i].params.logprobs
        assert [t for t, _ in lp.top] == list(np.argsort(-ref)[:k])
        np.testing.assert_allclose([v for _, v in lp.top], np.sort(ref)[::-1][:k], atol=1e-5)
    assert out.logprobs[3].rank == 2
    assert out.logprobs[2].top == []
