"""Multi-step plain rounds (SchedulerConfig.decode_steps): several tokens a session per
target call, each from the one verifier, so output is plain decoding's, seeded sampling
included, and a stop token or the request's length ends a session's steps."""

from __future__ import annotations

import pytest

from distspec.spec_decode.drafter import EMPTY_DRAFT, Draft
from distspec.spec_decode.sampling import SamplingParams
from distspec.workers.messages import Decoded, ForwardItem
from test_decoding import PROMPTS, encode, greedy_ar
from test_scheduler import make_scheduler, run, workers  # noqa: F401  (fixture)


def test_only_plain_items_take_more_than_one_step():
    with pytest.raises(ValueError, match="plain decoding"):
        ForwardItem(0, 0, 3, [5, 6], draft=Draft([6]), steps=2)
    with pytest.raises(ValueError, match="plain decoding"):
        ForwardItem(0, 0, 3, [5], defer=True, steps=2)
    ForwardItem(0, 0, 3, [5], draft=EMPTY_DRAFT, steps=2)


def test_a_multi_step_item_decodes_what_single_steps_do_and_stops_after_a_stop_token(
    workers,  # noqa: F811
    target,
):
    worker = workers[0]
    ids = encode(target, PROMPTS[0])
    expected = greedy_ar(target, ids, 9)
    worker.open_session(1, SamplingParams(max_new_tokens=9))
    try:
        (first,), _ = worker.step([ForwardItem(1, 0, 0, ids, draft=EMPTY_DRAFT)])
        assert first.next_token == expected[0]
        item = ForwardItem(1, 0, len(ids), [expected[0]], draft=EMPTY_DRAFT, steps=5)
        (decoded,), forward_s = worker.step([item])
        assert isinstance(decoded, Decoded) and decoded.new_tokens == expected[1:6]
        assert forward_s > 0
        # the same position again, now with expected[3] as a stop token: kept, then no more
        stops = frozenset({expected[3]})
        again = ForwardItem(1, 0, len(ids), [expected[0]], draft=EMPTY_DRAFT, steps=5, stops=stops)
        (stopped,), _ = worker.step([again])
        assert stopped.new_tokens == expected[1 : expected.index(expected[3], 1) + 1]
    finally:
        worker.close_session(1)


@pytest.mark.parametrize("steps", [3, 8])
def test_multi_step_rounds_equal_plain_decoding(workers, target, steps):  # noqa: F811
    sched = make_scheduler(workers, "ar", decode_steps=steps)
    try:
        prompts = [encode(target, p) for p in PROMPTS]
        # 37 tokens: the last round of each session is cut to what the request has left
        sessions = [sched.submit(ids, SamplingParams(max_new_tokens=37)) for ids in prompts]
        outs = run(sessions)
        for ids, out, s in zip(prompts, outs, sessions, strict=True):
            assert out == greedy_ar(target, ids, 37)
            assert s.finish_reason == "length"
            assert s.stats.target_forwards == 37  # every step counted: tau stays 1
        assert sched.times.steps > sched.times.rounds  # several forwards per call
        params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=11)
        alone = run([sched.submit(prompts[0], params)])[0]
        one_step = make_scheduler(workers, "ar", decode_steps=1)
        try:
            assert run([one_step.submit(prompts[0], params)])[0] == alone
        finally:
            one_step.close()
    finally:
        sched.close()


def test_a_stop_token_ends_a_multi_step_session(workers, target):  # noqa: F811
    ids = encode(target, PROMPTS[1])
    expected = greedy_ar(target, ids, 30)
    stop = expected[6]
    sched = make_scheduler(workers, "ar", decode_steps=4)
    try:
        (session,) = [sched.submit(ids, SamplingParams(max_new_tokens=30, stop_token_ids=[stop]))]
        out = run([session])[0]
        assert out == expected[: expected.index(stop) + 1]
        assert session.finish_reason == "stop"
    finally:
        sched.close()


@pytest.mark.parametrize("mode", ["sd", "auto"])
def test_speculative_modes_with_multi_step_plain_rounds_equal_plain_decoding(
    workers,  # noqa: F811
    target,
    mode,
):
    """Whatever the switch picks round by round (sd, or plain rounds of several steps)."""
    sched = make_scheduler(workers, mode, decode_steps=4)
    try:
        prompts = [encode(target, p) for p in PROMPTS]
        outs = run([sched.submit(ids, SamplingParams(max_new_tokens=33)) for ids in prompts])
        for ids, out in zip(prompts, outs, strict=True):
            assert out == greedy_ar(target, ids, 33)
    finally:
        sched.close()
