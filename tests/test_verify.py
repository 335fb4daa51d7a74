"""The verifier and the sampling distribution: unit tests and statistical losslessness."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from distspec.spec_decode.drafter import EMPTY_DRAFT, Draft
from distspec.spec_decode.sampling import SamplingParams, draw, probs_from_logits, race_noise
from distspec.spec_decode.verify import Verdict, verify

GREEDY = SamplingParams()
ALPHA = 1e-3  # significance level of every chi-square test (seeds are fixed)


def _logits(rows: int, vocab: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# greedy verification


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_all_accepted_gives_bonus_from_last_row(k):
    logits = _logits(k + 1, seed=k)
    best = logits.argmax(-1).tolist()
    draft = Draft(best[:k])
    verdict = verify(logits, draft, GREEDY, 0)
    assert verdict == Verdict(k, best[k])
    assert verdict.tokens(draft) == best


@pytest.mark.parametrize("k", [1, 2, 5])
def test_greedy_first_mismatch_gives_correction(k):
    logits = _logits(k + 1, seed=10 + k)
    best = logits.argmax(-1).tolist()
    for i in range(k):
        tokens = list(best[:k])
        tokens[i] = (best[i] + 1) % logits.shape[1]  # wrong at i
        # everything after the mismatch is irrelevant, even if it matches the target
        verdict = verify(logits, Draft(tokens), GREEDY, 0)
        assert verdict.num_accepted == i
        assert verdict.next_token == best[i]
        assert verdict.tokens(Draft(tokens)) == best[:i] + [best[i]]


def test_greedy_empty_draft_is_argmax_of_row_0():
    logits = _logits(1, seed=3)
    verdict = verify(logits, EMPTY_DRAFT, GREEDY, 0)
    assert verdict == Verdict(0, int(logits[0].argmax()))
    assert verdict.tokens(EMPTY_DRAFT) == [int(logits[0].argmax())]


def test_greedy_ignores_the_position():
    logits = _logits(4, seed=5)
    best = logits.argmax(-1).tolist()
    tokens = [best[0], best[1], (best[2] + 3) % 11]
    assert verify(logits, Draft(tokens), GREEDY, 0) == verify(logits, Draft(tokens), GREEDY, 77)
    assert verify(logits, Draft(tokens), GREEDY, 3) == Verdict(2, best[2])


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=1.0, seed=4)])
@pytest.mark.parametrize("k, rows", [(0, 2), (0, 0), (2, 4), (3, 1)])
def test_wrong_number_of_logit_rows_raises(params, k, rows):
    draft = Draft(list(range(k)))
    with pytest.raises(ValueError, match="logit rows"):
        verify(_logits(rows), draft, params, 0)


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=1.0, seed=4)])
def test_k_rows_verify_without_bonus(params):
    """PEARL's check of a drafter's first token: k rows, so all accepted means no bonus."""
    logits = _logits(3, seed=3)
    best = logits.argmax(-1).tolist()
    sure = torch.full((3, 11), -30.0)
    sure[torch.arange(3), torch.tensor(best)] = 30.0  # the target is certain: always accepted
    for rows in (logits, sure):
        verdict = verify(rows, Draft(best), params, 0)
        if params.greedy or rows is sure:
            assert verdict == Verdict(3, None)
    wrong = [best[0], (best[1] + 1) % 11, best[2]]
    verdict = verify(sure, Draft(wrong), params, 0)
    assert verdict == Verdict(1, best[1])  # a rejection still yields the correction


# ---------------------------------------------------------------------------------------------
# the target distribution: temperature, top-k, top-p


def test_temperature_scales_logits():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0]])
    for t in (0.5, 1.0, 2.0, 7.0):
        got = probs_from_logits(logits, SamplingParams(temperature=t))
        torch.testing.assert_close(got, torch.softmax(logits / t, -1))
    # temperature -> 0 concentrates on the argmax
    cold = probs_from_logits(logits, SamplingParams(temperature=1e-3))
    assert cold[0, 1] > 0.999999


def test_probs_are_float32_and_normalised_for_half_logits():
    logits = _logits(3).half()
    probs = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.9, top_k=5))
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_top_k_keeps_exactly_k(k):
    logits = _logits(4, vocab=10, seed=7)  # no ties (continuous random values)
    probs = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=k))
    kept = probs > 0
    assert kept.sum(-1).tolist() == [k] * 4
    top = torch.topk(logits, k, dim=-1).indices
    assert kept.gather(-1, top).all()
    # the kept tokens keep their relative weights
    ref = torch.softmax(logits.masked_fill(~kept, float("-inf")), -1)
    torch.testing.assert_close(probs, ref)


def test_top_k_zero_or_larger_than_vocab_keeps_all():
    logits = _logits(2, vocab=6)
    for k in (0, 6, 100):
        probs = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=k))
        torch.testing.assert_close(probs, torch.softmax(logits, -1))


def test_top_k_keeps_ties():
    logits = torch.tensor([[3.0, 1.0, 3.0, 0.0, 1.0]])
    probs = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=1))
    assert (probs > 0).tolist() == [[True, False, True, False, False]]


# p = [0.1, 0.4, 0.2, 0.3]: sorted 0.4, 0.3, 0.2, 0.1; cumulative 0.4, 0.7, 0.9, 1.0
HAND_P = torch.tensor([[0.1, 0.4, 0.2, 0.3]])


@pytest.mark.parametrize(
    "top_p, kept",
    [
        (1e-6, [1]),
        (0.35, [1]),
        (0.4 - 1e-4, [1]),
        (0.5, [1, 3]),
        (0.65, [1, 3]),
        (0.75, [1, 3, 2]),
        (0.95, [1, 3, 2, 0]),
        (1.0, [1, 3, 2, 0]),
    ],
)
def test_top_p_keeps_smallest_prefix_reaching_p(top_p, kept):
    probs = probs_from_logits(HAND_P.log(), SamplingParams(temperature=1.0, top_p=top_p))
    expected = torch.zeros_like(HAND_P)
    expected[0, kept] = HAND_P[0, kept] / HAND_P[0, kept].sum()
    torch.testing.assert_close(probs, expected)


def test_top_p_is_per_row():
    p = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.7, 0.1, 0.1, 0.1]])
    probs = probs_from_logits(p.log(), SamplingParams(temperature=1.0, top_p=0.6))
    assert (probs > 0).tolist() == [[False, True, False, True], [True, False, False, False]]


def test_top_k_then_top_p():
    # top-k 3 of HAND_P: 0.4, 0.3, 0.2 -> renormalised 4/9, 3/9, 2/9 (cum 0.44, 0.78, 1)
    probs = probs_from_logits(HAND_P.log(), SamplingParams(temperature=1.0, top_k=3, top_p=0.7))
    torch.testing.assert_close(probs, torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7]]))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_p=1e-9),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0, top_k=1, top_p=1e-9),
        SamplingParams(temperature=1e-4, top_p=0.01),
    ],
)
def test_always_keeps_at_least_one_token(params):
    logits = _logits(5, vocab=50, seed=1) * 30  # very peaked rows
    probs = probs_from_logits(logits, params)
    assert ((probs > 0).sum(-1) >= 1).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    assert probs.argmax(-1).tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
    ],
)
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_greedy_flag():
    assert SamplingParams().greedy
    assert SamplingParams(temperature=0.0, top_k=3).greedy
    assert not SamplingParams(temperature=0.1).greedy


# ---------------------------------------------------------------------------------------------
# statistical losslessness of the verifier

V = 6
P = np.array([0.30, 0.25, 0.20, 0.15, 0.07, 0.03])  # target
P_NEXT = P[::-1].copy()  # the target's row after the draft token (bonus row)
Q = np.array([0.05, 0.10, 0.15, 0.20, 0.25, 0.25])  # a drafter quite unlike the target
TRIALS = 12_000  # seeds: each trial is one request's draw at one position


def reference_target(p: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Independent reference: temperature, then top-k, then top-p (smallest prefix >= p)."""
    t = p ** (1.0 / params.temperature)
    t = t / t.sum()
    order = np.argsort(-t, kind="stable")
    keep = np.ones_like(t, dtype=bool)
    if 0 < params.top_k < len(t):
        keep[order[params.top_k :]] = False
    t = np.where(keep, t, 0.0)
    t = t / t.sum()
    if params.top_p < 1:
        cum = np.cumsum(t[order])
        n = int(np.searchsorted(cum, params.top_p - 1e-12)) + 1  # first index reaching top_p
        drop = order[n:]
        t[drop] = 0.0
        t = t / t.sum()
    return t


def _always_accept(logits, draft, params, pos):
    """Negative control: emits every draft token (no check at all)."""
    bonus = draw(probs_from_logits(logits[len(draft)], params), params.seed, pos + len(draft))
    return Verdict(len(draft), int(bonus[0]))


def _one_seed(logits, draft, params, pos):
    """Negative control: every request races the same noise (seed 0's)."""
    return verify(logits, draft, dataclasses.replace(params, seed=0), pos)


def emitted_counts(
    params: SamplingParams,
    *,
    drafts: str = "coupled",
    drafter: np.ndarray = Q,
    verifier=verify,
    trials: int = TRIALS,
    position: int = 0,
    pos: int = 5,
) -> tuple[np.ndarray, float]:
    """(counts of the emitted token at `position`, acceptance rate of the draft's token) over
    `trials` requests (seeds) verifying a one-token draft at sequence position pos, drafted by
    a drafter of distribution `drafter`: racing the request's noise ("coupled"), with randomness of
    its own ("independent"), or a fixed token ("fixed:<id>")."""
    logits = torch.tensor(np.log(np.stack([P, P_NEXT])), dtype=torch.float32)
    q = probs_from_logits(torch.tensor(np.log(drafter), dtype=torch.float32), params)
    own = torch.Generator().manual_seed(12345)
    counts = np.zeros(V, dtype=np.int64)
    accepted = 0
    for seed in range(trials):
        request = SamplingParams(
            temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=seed
        )
        if drafts == "coupled":
            d = int(draw(q, seed, pos)[0])
        elif drafts == "independent":
            d = int(torch.multinomial(q, 1, generator=own))
        else:
            d = int(drafts.removeprefix("fixed:"))
        verdict = verifier(logits, Draft([d]), request, pos)
        accepted += verdict.num_accepted
        out = verdict.tokens(Draft([d]))
        if len(out) > position:
            counts[out[position]] += 1
    return counts, accepted / trials


def chisquare_pvalue(counts: np.ndarray, expected_probs: np.ndarray) -> float:
    """Chi-square goodness of fit; zero-probability cells must be empty and are left out."""
    zero = expected_probs == 0
    assert counts[zero].sum() == 0, f"tokens with probability 0 were emitted: {counts}"
    n = counts.sum()
    exp = expected_probs[~zero] / expected_probs[~zero].sum() * n
    return float(chisquare(counts[~zero], exp).pvalue)


SAMPLED_CASES = {
    "t1": SamplingParams(temperature=1.0),
    "t0.5": SamplingParams(temperature=0.5),
    "t2": SamplingParams(temperature=2.0),
    "top_k3": SamplingParams(temperature=1.0, top_k=3),
    "top_p0.8": SamplingParams(temperature=1.0, top_p=0.8),
    "t1.5_k5_p0.9": SamplingParams(temperature=1.5, top_k=5, top_p=0.9),
}


def test_reference_target_matches_probs_from_logits():
    for params in SAMPLED_CASES.values():
        got = probs_from_logits(torch.tensor(np.log(P))[None], params)[0].double().numpy()
        np.testing.assert_allclose(got, reference_target(P, params), atol=1e-6)
    # hand check of one case: top-p 0.8 of P keeps 0.30 + 0.25 + 0.20 + 0.15 = 0.9
    np.testing.assert_allclose(
        reference_target(P, SAMPLED_CASES["top_p0.8"]), [*(P[:4] / 0.9), 0, 0], atol=1e-12
    )


@pytest.mark.parametrize("case", list(SAMPLED_CASES))
@pytest.mark.parametrize("drafts", ["coupled", "independent"])
def test_verifier_is_lossless_with_sampled_draft(case, drafts):
    params = SAMPLED_CASES[case]
    counts, _ = emitted_counts(params, drafts=drafts)
    pvalue = chisquare_pvalue(counts, reference_target(P, params))
    print(f"verify {drafts} q {case}: chi-square p = {pvalue:.4g}")
    assert pvalue > ALPHA, (counts, reference_target(P, params))


@pytest.mark.parametrize(
    "case, d",
    [("t1", 0), ("t1", 4), ("t0.5", 2), ("top_k3", 5), ("top_p0.8", 1), ("t1.5_k5_p0.9", 3)],
)
def test_verifier_is_lossless_with_a_fixed_draft(case, d):
    params = SAMPLED_CASES[case]
    counts, acceptance = emitted_counts(params, drafts=f"fixed:{d}")
    target = reference_target(P, params)
    pvalue = chisquare_pvalue(counts, target)
    print(f"verify fixed d={d} {case}: chi-square p = {pvalue:.4g}")
    assert pvalue > ALPHA, (counts, target)
    assert abs(acceptance - target[d]) < 0.02  # a fixed token is accepted with p(d)


@pytest.mark.parametrize("drafts", ["coupled", "fixed:1"])
def test_second_position_follows_next_row(drafts):
    """Given the draft token was accepted, the token after it is the target's next row."""
    params = SAMPLED_CASES["t1"]
    counts, _ = emitted_counts(params, drafts=drafts, position=1)
    assert counts.sum() > 2000  # enough accepted drafts to test
    pvalue = chisquare_pvalue(counts, P_NEXT)
    print(f"verify second position {drafts}: chi-square p = {pvalue:.4g}")
    assert pvalue > ALPHA


@pytest.mark.parametrize(
    "verifier, drafts, position, expected",
    [(_always_accept, "independent", 0, P), (_one_seed, "independent", 0, P)],
)
def test_chi_square_detects_a_wrong_verifier(verifier, drafts, position, expected):
    """Negative control: the same test, fed a broken verifier, rejects it."""
    params = SAMPLED_CASES["t1"]
    counts, _ = emitted_counts(
        params, drafts=drafts, verifier=verifier, trials=TRIALS // 2, position=position
    )
    pvalue = chisquare_pvalue(counts, expected)
    print(f"negative control {verifier.__name__}: chi-square p = {pvalue:.3g}")
    assert pvalue < 1e-6


def test_coupled_drafts_are_accepted_about_as_often_as_rejection_sampling_would():
    """The acceptance of racing the same noise lies between (1 - TV) / (1 + TV) and the
    optimum 1 - TV; drafting with randomness of one's own gets only sum(p * q)."""
    params = SAMPLED_CASES["t1"]
    near = (0.8 * P + 0.2 * Q) / (0.8 * P + 0.2 * Q).sum()  # a drafter close to the target
    tv = 0.5 * np.abs(P - near).sum()
    _, coupled = emitted_counts(params, drafts="coupled", drafter=near, trials=4000)
    _, independent = emitted_counts(params, drafts="independent", drafter=near, trials=4000)
    print(f"1 - TV {1 - tv:.3f}: coupled {coupled:.3f}, independent {independent:.3f}")
    assert (1 - tv) / (1 + tv) - 0.02 < coupled < 1 - tv + 0.02
    assert abs(independent - float((P * near).sum())) < 0.03
    assert coupled > independent + 0.3


def test_the_output_is_the_targets_draw_whatever_was_drafted():
    """Same seed, same tokens: each emitted token is the target's own draw at its position,
    for a good draft, a bad one, a long one or none."""
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=21)
    logits = _logits(5, vocab=7, seed=11)
    p = probs_from_logits(logits, params)
    own = draw(p, 21, 40).tolist()  # positions 40..44
    for tokens in ([], own[:1], own[:4], [(own[0] + 1) % 7], own[:2] + [(own[2] + 1) % 7]):
        verdict = verify(logits[: len(tokens) + 1], Draft(tokens), params, 40)
        n = verdict.num_accepted
        assert verdict.tokens(Draft(tokens)) == own[: n + 1]
        assert n == len(tokens) or tokens[n] != own[n]


def test_sampled_verification_needs_a_seed():
    with pytest.raises(ValueError, match="seed"):
        verify(_logits(1), EMPTY_DRAFT, SamplingParams(temperature=1.0), 0)
    assert SamplingParams(temperature=1.0).seeded().seed is not None
    assert SamplingParams(temperature=1.0, seed=3).seeded().seed == 3
    assert SamplingParams().seeded().seed is None  # greedy needs none


def test_point_mass_on_impossible_token_is_always_rejected():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0])
    logits = torch.stack([p.log(), p.log()])
    for seed in range(200):
        params = SamplingParams(temperature=1.0, seed=seed)
        for d in (3, 4):
            verdict = verify(logits, Draft([d]), params, 9)
            assert verdict.num_accepted == 0
            assert verdict.next_token in (0, 1, 2)


# ---------------------------------------------------------------------------------------------
# the noise


def test_noise_is_a_function_of_seed_and_position():
    a = race_noise(7, 3, 16)
    assert torch.equal(a, race_noise(7, 3, 16))
    assert bool((a > 0).all())
    others = [race_noise(7, 4, 16), race_noise(8, 3, 16), race_noise(6, 4, 16)]
    assert not any(torch.equal(a, b) for b in others)


def test_draws_follow_probs_across_seeds_and_positions():
    probs = torch.tensor([0.0, 0.7, 0.0, 0.3])
    by_seed = [int(draw(probs, s, 0)[0]) for s in range(2000)]
    by_pos = draw(probs.expand(2000, 4), 1, 0).tolist()
    for draws in (by_seed, by_pos):
        assert set(draws) <= {1, 3}
        assert math.isclose(draws.count(1) / len(draws), 0.7, abs_tol=0.05)
