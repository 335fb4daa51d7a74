"""PEARL on tiny random models: the state machine, greedy exactness, sampling losslessness."""

from __future__ import annotations

import pytest

from distspec.spec_decode.draft_policy import DraftCosts
from distspec.spec_decode.drafter import EMPTY_DRAFT, Draft
from distspec.spec_decode.pearl import PearlDecoder, PearlPace, PearlState, pearl_gamma
from distspec.spec_decode.sampling import SamplingParams
from distspec.spec_decode.verify import Verdict
from test_decoding import (
    ALPHA,
    PROMPTS,
    SAMPLES,
    SMALL_PROMPT,
    OracleDrafter,
    encode,
    exact_joint,
    gof_pvalue,
    greedy_ar,
    make_drafter,
    marginal,
    sample_outcomes,
)

# ---------------------------------------------------------------------------------------------
# the state machine


def test_pre_verify_reject_then_accept_then_post_verify():
    tokens = [5, 6, 7]
    state = PearlState()
    assert state.mode == "pre"
    assert state.target_chunk(tokens) == (2, [7])
    assert state.draft_context(tokens) == [5, 6, 7]

    draft = Draft([1, 2, 3])
    assert state.candidate(draft).tokens == [1]
    # pre-verify rejects the first token: the correction, nothing pending
    assert state.apply(Verdict(0, 9), draft) == [9]
    assert state.mode == "pre"

    tokens += [9]
    draft = Draft([1, 2, 3])
    # pre-verify accepts it: no bonus row exists, the rest of the draft is pending
    assert state.apply(Verdict(1, None), draft) == [1]
    tokens += [1]
    assert state.mode == "post" and state.pending.tokens == [2, 3]
    assert state.target_chunk(tokens) == (4, [1, 2, 3])
    assert state.draft_context(tokens) == [5, 6, 7, 9, 1, 2, 3]

    # post-verify: pending + the new draft's first token all accepted
    draft = Draft([4, 5, 6, 7])
    assert state.candidate(draft).tokens == [2, 3, 4]
    assert state.apply(Verdict(3, None), draft) == [2, 3, 4]
    tokens += [2, 3, 4]
    assert state.pending.tokens == [5, 6, 7]

    # post-verify rejects at index 1: back to pre-verify
    draft = Draft([8, 8])
    assert state.apply(Verdict(1, 0), draft) == [5, 0]
    assert state.mode == "pre" and state.pending == EMPTY_DRAFT


def test_empty_draft_verifies_pending_with_a_bonus():
    state = PearlState(pending=Draft([4, 5]))
    assert state.candidate(EMPTY_DRAFT).tokens == [4, 5]
    assert state.apply(Verdict(2, 6), EMPTY_DRAFT) == [4, 5, 6]
    assert state.mode == "pre"


def test_pearl_gamma_balances_a_draft_burst_with_its_verify():
    # no table: t_verify(g) = t_step * (1 + beta * (g - 1))
    assert pearl_gamma(DraftCosts(t_step=0.020, t_draft=0.002, beta=0.0), 16) == 10
    assert pearl_gamma(DraftCosts(t_step=0.020, t_draft=0.002, beta=0.05), 16) == 16
    assert pearl_gamma(DraftCosts(t_step=0.020, t_draft=0.001, beta=0.05), 8) == 8
    assert pearl_gamma(DraftCosts(t_step=0.001, t_draft=0.020, beta=0.05), 8) == 1
    assert pearl_gamma(None, 6) == 6
    # the pinned demo pair: a 1-core target step of 47.7 ms, 10.6 ms per draft token
    table = ((1, 0.0477), (3, 0.0527), (5, 0.0560), (7, 0.0610), (9, 0.0700))
    costs = DraftCosts(t_step=0.0477, t_draft=0.0106, beta=0.0, verify=table)
    assert pearl_gamma(costs, 8) == 5  # 53 ms of drafting against a 56 ms verify


# ---------------------------------------------------------------------------------------------
# decoding


def test_the_live_pace_drafts_one_token_past_the_balance():
    """ceil(T / t) + 1 from the last rounds' target seconds T and seconds per drafted token
    t, within 1..max_gamma; a faster drafter then drafts longer, a slower one shorter."""
    pace = PearlPace(max_gamma=12, gamma=5, decay=0.0)  # decay 0: the last round alone
    pace.observe(target_s=0.080, draft_s=0.050, drafted=5)  # T / t = 8
    assert pace.gamma == 9
    pace.observe(target_s=0.080, draft_s=0.150, drafted=5)  # T / t = 2.67
    assert pace.gamma == 4
    pace.observe(target_s=0.080, draft_s=0.004, drafted=4)  # T / t = 80
    assert pace.gamma == 12
    pace.observe(target_s=0.001, draft_s=0.500, drafted=5)
    assert pace.gamma == 2  # at least one past a draft of 1
    pace.observe(target_s=0.080, draft_s=0.0, drafted=0)  # nothing drafted: t stays 0.1 s
    assert pace.gamma == 2


@pytest.mark.parametrize("resume", ["pre", "post"])
@pytest.mark.parametrize("gamma", [1, 3, 6])
@pytest.mark.parametrize("kind", ["model", "ngram", "lookup"])
def test_greedy_pearl_equals_greedy_ar(target, draft_model, kind, gamma, resume):
    drafted = 0
    for text in PROMPTS:
        ids = encode(target, text)
        expected = greedy_ar(target, ids, 40)
        drafter = make_drafter(kind, draft_model)
        dec = PearlDecoder(target.model, drafter, gamma, eos_token_ids=[], resume=resume)
        out, last = dec.generate(ids, SamplingParams(max_new_tokens=40))
        assert out == expected, text
        assert last.finish_reason == "length"
        drafted += last.stats.draft_tokens
    assert drafted > 0


def test_post_verify_keeps_a_right_drafter_running(target):
    """With a drafter that is always right, every round after the first verifies gamma tokens
    (gamma - 1 pending + the new first one), with no bonus token."""
    ids = encode(target, "Once upon a time")
    greedy = greedy_ar(target, ids, 41)
    oracle = OracleDrafter(ids + greedy)  # also checks each context is the true sequence
    dec = PearlDecoder(target.model, oracle, gamma=4, eos_token_ids=[])
    out, last = dec.generate(ids, SamplingParams(max_new_tokens=41))
    assert out == greedy
    stats = last.stats
    # prefill: 1 token; round 1 (pre-verify): 1; then 4 per round: 39 tokens in 10 rounds
    assert stats.target_forwards == 1 + 1 + 10
    assert stats.accepted_tokens == stats.draft_tokens
    # resumed post-verify, the first round verifies a whole draft: 40 tokens in 10 rounds
    post = PearlDecoder(target.model, oracle, gamma=4, eos_token_ids=[], resume="post")
    out, last = post.generate(ids, SamplingParams(max_new_tokens=41))
    assert out == greedy and last.stats.target_forwards == 1 + 10


def test_stop_token_inside_post_verified_chunk(target):
    ids = encode(target, "Once upon a time")
    greedy = greedy_ar(target, ids, 30)
    j = next(j for j in range(8, 20) if greedy[j] not in greedy[:j])
    dec = PearlDecoder(target.model, OracleDrafter(ids + greedy), gamma=4, eos_token_ids=[])
    out, last = dec.generate(ids, SamplingParams(max_new_tokens=30, stop_token_ids=[greedy[j]]))
    assert out == greedy[: j + 1]
    assert last.finish_reason == "stop"


@pytest.mark.parametrize("max_new", [1, 2, 3, 5, 9])
def test_max_new_tokens_exact(target, draft_model, max_new):
    ids = encode(target, "abcabcabcabc")
    for kind in ("model", "ngram"):
        dec = PearlDecoder(target.model, make_drafter(kind, draft_model), 4, eos_token_ids=[])
        out, last = dec.generate(ids, SamplingParams(max_new_tokens=max_new, temperature=1.0))
        assert len(out) == max_new and last.finish_reason == "length"


# chi-square over thousands of sampled runs: minutes on 2 cores (make test runs it; test-fast
# keeps the verifier's own statistical tests, test_verify.py)
@pytest.mark.slow
# each drafter with one parameter set (dense q at t=1; lookup's point masses under filters):
# the verifier is shared, test_verify.py covers every filter with both kinds of q
@pytest.mark.parametrize(
    "kind, params",
    [
        ("model", SamplingParams(temperature=1.0)),
        ("lookup", SamplingParams(temperature=0.7, top_k=5, top_p=0.9)),
    ],
    ids=["model-t1", "lookup-t0.7_k5_p0.9"],
)
def test_pearl_sampling_matches_exact_target_distribution(small, kind, params):
    """Token 2 is pre-verified; token 3 is post-verified (pending) or follows a rejection."""
    tgt, dft = small
    exact = exact_joint(tgt.model, SMALL_PROMPT, params)
    seeds = range(500_000, 500_000 + SAMPLES)
    drafter = make_drafter(kind, dft)
    counts, totals = sample_outcomes(tgt.model, drafter, params, seeds, decoder_cls=PearlDecoder)
    assert 0.1 * totals["draft"] < totals["accepted"] < 0.9 * totals["draft"]
    pvalues = [gof_pvalue(counts, exact)]
    pvalues += [gof_pvalue(marginal(counts, i), marginal(exact, i)) for i in range(3)]
    print(f"pearl {kind} {params}: p = {', '.join(f'{p:.3g}' for p in pvalues)}")
    assert min(pvalues) > ALPHA


def test_the_batch_gamma_is_the_fastest_round_not_the_longest_that_fits():
    from distspec.spec_decode.draft_policy import DraftCosts
    from distspec.spec_decode.pearl import pearl_batch_gamma

    # one core each, measured: the verify turns compute-bound past 5 rows; drafting 4
    # sessions at once costs 7.4 ms a step
    verify = ((1, 0.0254), (5, 0.0246), (9, 0.0363), (17, 0.0612), (33, 0.1116), (65, 0.2539))
    costs = DraftCosts(0.0254, 0.0054, 0.1, verify, 0.9, ((1, 0.0054), (4, 0.0074), (16, 0.0256)))
    assert pearl_gamma(costs, 8) == 4  # one session: 5 tokens (27 ms) outlast 5 rows (24.6)
    fastest = pearl_batch_gamma(costs, 8, batch=4, per_drafter=4)
    assert 2 <= fastest <= 5  # 8 fits too, but its 32-row verify makes fewer tokens a second
    # rows nearly free (a GPU): the longest draft
    flat = DraftCosts(0.01, 0.001, 0.0, ((1, 0.01), (64, 0.011)), 0.9, ((1, 0.001), (16, 0.0012)))
    assert pearl_batch_gamma(flat, 8, batch=4, per_drafter=4) == 8
