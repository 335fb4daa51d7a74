"""The adaptive draft-length policy, alone and inside the decoding loop."""

from __future__ import annotations

from dataclasses import replace

import pytest

from distspec.models.loader import load_model
from distspec.spec_decode.decoding import SpeculativeDecoder
from distspec.spec_decode.draft_policy import DraftCosts, DraftLengthPolicy, costs_from
from distspec.spec_decode.drafter import Draft, Drafter
from distspec.spec_decode.drafters import NgramDrafter
from distspec.spec_decode.sampling import SamplingParams


def warmed(policy: DraftLengthPolicy, t_step=0.02, t_draft=0.002) -> DraftLengthPolicy:
    policy.observe_round(0, 0, 0.0, t_step)
    policy.observe_round(4, 2, 4 * t_draft, t_step * 1.3)
    return policy


def test_fixed_policy_always_drafts_max():
    p = DraftLengthPolicy(max_k=5, fixed=True)
    assert [p.next_k() for _ in range(3)] == [5, 5, 5]


def test_first_round_is_a_plain_step_then_max():
    p = DraftLengthPolicy(max_k=6)
    assert p.next_k() == 0  # measures the target's one-token step first
    p.observe_round(0, 0, 0.0, 0.02)
    assert p.next_k() == 6  # no draft timing yet: try the most


def test_high_acceptance_and_cheap_drafts_draft_long():
    p = warmed(DraftLengthPolicy(max_k=8, alpha=0.9))
    for _ in range(30):
        p.observe_round(8, 8, 8 * 0.001, 0.026)
    assert p.alpha > 0.95
    assert p.next_k() == 8


def test_low_acceptance_switches_speculation_off_and_probes():
    p = warmed(DraftLengthPolicy(max_k=8, probe_every=4))
    for _ in range(60):
        p.observe_round(2, 0, 2 * 0.004, 0.03)
    assert p.alpha < 0.05
    ks = [p.next_k() for _ in range(8)]
    assert ks.count(0) == 6 and ks.count(1) == 2  # off, with a probe every 4th round


def test_expensive_drafts_shorten_the_draft():
    cheap = warmed(DraftLengthPolicy(max_k=8, alpha=0.7), t_draft=0.0005)
    dear = warmed(DraftLengthPolicy(max_k=8, alpha=0.7), t_draft=0.004)
    assert 0 < dear.best_k() < cheap.best_k()


def test_alpha_follows_geometric_estimate():
    p = DraftLengthPolicy(alpha=0.5, decay=0.0)  # no memory: last round only
    p.observe_round(4, 3, 0.01, 0.03)  # 3 successes then a failure
    assert p.alpha == pytest.approx(0.75)
    p.observe_round(4, 4, 0.01, 0.03)  # all accepted: no failure observed
    assert p.alpha == pytest.approx(1.0)


class WrongDrafter(Drafter):
    """Always proposes a token the target never picks greedily (checked by the caller)."""

    name = "wrong"

    def __init__(self, token: int):
        self.token = token

    def start(self, prompt_ids, params):
        pass

    def propose(self, context, k):
        return Draft([self.token] * k)


@pytest.fixture(scope="module")
def target(tiny_dir):
    return load_model(str(tiny_dir), max_len=256)


def test_adaptive_decoding_is_lossless(target):
    prompt = target.tokenizer.encode("abcabcabcabc")
    params = SamplingParams(max_new_tokens=60)
    ar, _ = SpeculativeDecoder(target.model, None, eos_token_ids=[]).generate(prompt, params)
    dec = SpeculativeDecoder(target.model, NgramDrafter(), gamma=6, eos_token_ids=[], adaptive=True)
    sd, _ = dec.generate(prompt, params)
    assert sd == ar


def test_useless_drafter_is_switched_off(target):
    prompt = target.tokenizer.encode("Hello there")
    params = SamplingParams(max_new_tokens=80)
    ar, _ = SpeculativeDecoder(target.model, None, eos_token_ids=[]).generate(prompt, params)
    wrong = next(t for t in range(256) if t not in ar)
    fixed = SpeculativeDecoder(target.model, WrongDrafter(wrong), gamma=4, eos_token_ids=[])
    costs = DraftCosts(t_step=0.010, t_draft=0.002, beta=0.1)  # no timing: deterministic
    adaptive = SpeculativeDecoder(
        target.model, WrongDrafter(wrong), gamma=4, eos_token_ids=[], adaptive=True, costs=costs
    )
    out_f, last_f = fixed.generate(prompt, params)
    out_a, last_a = adaptive.generate(prompt, params)
    assert out_f == out_a == ar
    # every round drafts (fewer in the last rounds, capped by max_new_tokens), all rejected
    assert last_f.stats.draft_tokens == 4 * 79 - (1 + 2 + 3 + 4)
    assert last_a.stats.accepted_tokens == 0
    assert last_a.stats.draft_tokens < last_f.stats.draft_tokens / 4


def test_verify_table_is_interpolated_and_extrapolated():
    table = ((1, 0.010), (3, 0.012), (7, 0.020))
    c = DraftCosts(t_step=0.010, t_draft=0.001, beta=0.0, verify=table)
    assert c.t_verify(1) == pytest.approx(0.010)
    assert c.t_verify(2) == pytest.approx(0.011)
    assert c.t_verify(5) == pytest.approx(0.016)
    assert c.t_verify(9) == pytest.approx(0.024)  # along the last segment
    assert DraftCosts(0.010, 0.001, beta=0.5).t_verify(3) == pytest.approx(0.020)  # no table


def test_a_measured_table_reaches_long_drafts_a_line_would_not():
    # the demo target on this CPU: up to 9 rows cost 1.0-1.6 steps, 13 rows 2.3 (a second
    # pass over each weight row); a line through the 13-row point overprices 6-9 rows
    table = ((1, 0.039), (2, 0.042), (3, 0.045), (5, 0.049), (7, 0.059), (9, 0.061), (13, 0.089))
    measured = costs_from(table, t_draft=0.0125)
    line = DraftCosts(measured.t_step, measured.t_draft, measured.beta)
    k_line = DraftLengthPolicy(max_k=12, alpha=0.95, costs=line).best_k()
    k_table = DraftLengthPolicy(max_k=12, alpha=0.95, costs=measured).best_k()
    assert (k_line, k_table) == (6, 8)


def test_each_draft_token_weighs_alike_in_alpha():
    long, short = DraftLengthPolicy(alpha=0.6), DraftLengthPolicy(alpha=0.6)
    long.observe_round(8, 8, 0.01, 0.03)
    for _ in range(4):
        short.observe_round(2, 2, 0.01, 0.03)
    assert long.alpha == pytest.approx(short.alpha)  # 8 successes either way
    assert long.alpha == pytest.approx(1 - 0.4 * long.decay**8)


def test_the_draft_length_follows_the_batch():
    """One core's target: 1 row 48 ms, then about 3 ms more per row (compute-bound from a
    few dozen rows); drafting 16 sessions at once costs 3x drafting one."""
    verify = ((1, 0.048), (9, 0.070), (33, 0.150), (129, 0.450))
    costs = DraftCosts(
        t_step=0.048, t_draft=0.011, beta=0.0, verify=verify, prior_alpha=0.95,
        draft_batch=((1, 0.011), (4, 0.015), (16, 0.033)),
    )  # fmt: skip
    assert costs.t_draft_at(1) == 0.011 and costs.t_draft_at(16) == pytest.approx(0.033)
    assert costs.t_draft_at(10) == pytest.approx(0.024)
    policy = DraftLengthPolicy(max_k=8, costs=costs)
    ks = [policy.best_k(batch) for batch in (1, 4, 16)]
    # 16 sessions: 32 rows for one draft token each cost more than the tokens they bring
    assert ks[0] == 8 and ks[0] > ks[1] > ks[2] and ks[1] > 0 and ks[2] == 0, ks
    assert policy.next_k(4) == ks[1]
    cheaper = dict(verify=((1, 0.048), (9, 0.060), (33, 0.090), (129, 0.250)))
    assert DraftLengthPolicy(max_k=8, costs=replace(costs, **cheaper)).best_k(16) > 0
    # a drafter as slow as the target: speculation pays at no batch size
    slow = DraftLengthPolicy(max_k=8, costs=DraftCosts(0.048, 0.040, 0.0, verify, 0.6))
    assert [slow.best_k(b) for b in (1, 4, 16)] == [0, 0, 0]


def test_node_prices_follow_measured_rows_and_grow_with_the_batch():
    """A tree node must be worth the verify row it adds: priced on the measured table's lower
    convex hull (a lumpy table never makes a later node cheaper), per output token's cost."""
    # this CPU's shape: the second row is nearly free, then about 3-4 ms a row
    verify = ((1, 0.020), (2, 0.021), (3, 0.032), (4, 0.031), (8, 0.047), (16, 0.082))
    costs = DraftCosts(t_step=0.020, t_draft=0.0, beta=0.0, verify=verify, prior_alpha=0.6)
    policy = DraftLengthPolicy(max_k=8, costs=costs)
    one = policy.node_prices(k=4, batch=1, nodes=12)
    assert len(one) == 12 and all(b >= a - 1e-12 for a, b in zip(one, one[1:], strict=False))
    assert one[0] < 0.1 < one[3]  # the nearly free second row, then real rows
    sixteen = policy.node_prices(k=4, batch=16, nodes=12)
    assert all(b > a for a, b in zip(one, sixteen, strict=True))  # at load, nodes cost more
    assert DraftLengthPolicy(costs=None).node_prices(4) == ()
