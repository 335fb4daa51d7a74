"""Prompt prefix reuse (models/prefix_cache.py): a prompt runs only what its KV slot does not
hold of it, every write cuts a slot's record, and outputs equal a fresh prefill's."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from distspec.models.prefix_cache import SlotPrefixes
from distspec.spec_decode.decoding import GenerationStats, SpeculativeDecoder
from distspec.spec_decode.drafter import EMPTY_DRAFT
from distspec.spec_decode.drafters.model import ModelDrafter
from distspec.spec_decode.pearl import PearlDecoder
from distspec.spec_decode.sampling import SamplingParams
from distspec.workers.messages import ForwardItem
from distspec.workers.target import TargetSpec, TargetWorker
from test_decoding import encode, record_forwards
from test_scheduler import make_scheduler, run, workers  # noqa: F401 (a fixture)

SYSTEM = "You are a helpful assistant. Answer briefly.\n"


@contextmanager
def no_reuse(*models):
    for m in models:
        m.prefixes.forget()
        m.prefixes.enabled = False
    try:
        yield
    finally:
        for m in models:
            m.prefixes.enabled = True


def test_slot_record():
    p = SlotPrefixes(2)
    p.hold(0, [1, 2, 3, 4, 5])
    assert p.reusable(0, [1, 2, 3, 9]) == 3
    assert p.reusable(0, [1, 2, 3, 4, 5]) == 4  # the last token is run for its logits
    assert p.reusable(0, [1, 2, 3, 4, 5], limit=5) == 5
    assert p.reusable(1, [1, 2, 3]) == 0  # another slot's
    p.written(0, 7)
    assert p.held(0) == [1, 2, 3, 4, 5]  # past the record: nothing lost
    p.written(0, 2)
    assert p.held(0) == [1, 2]
    off = SlotPrefixes(1, enabled=False)
    off.hold(0, [1, 2, 3])
    assert off.reusable(0, [1, 2, 3, 4]) == 0


def test_every_write_cuts_the_record(target):
    model = target.model
    model.prefixes.hold(0, list(range(10, 30)))
    model(torch.tensor([[5, 6]]), torch.tensor([[12, 13]]), torch.tensor([0]))
    assert model.prefixes.held(0) == list(range(10, 22))
    model.move_kv(0, [9, 10], [7, 8])
    assert model.prefixes.held(0) == list(range(10, 17))


def _decoder(kind, target, draft_model):
    if kind == "ar":
        return SpeculativeDecoder(target.model, None, eos_token_ids=[])
    drafter = ModelDrafter(draft_model.model)
    cls = PearlDecoder if kind == "pearl" else SpeculativeDecoder
    return cls(target.model, drafter, gamma=3, eos_token_ids=[])


@pytest.mark.parametrize("kind", ["ar", "sd", "pearl"])
def test_decoder_reuses_the_last_sequence_and_equals_a_fresh_prefill(target, draft_model, kind):
    first = encode(target, SYSTEM + "Tell me about cats.")
    second = encode(target, SYSTEM + "Tell me about dogs and their owners.")
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    params = SamplingParams(max_new_tokens=12)
    dec = _decoder(kind, target, draft_model)
    out1, last1 = dec.generate(first, params)
    out2, last2 = dec.generate(second, params)
    # a later turn of the same chat: the first prompt, its answer and a new message
    third = first + out1 + encode(target, " And lions?")
    out3, last3 = dec.generate(third, params)
    assert last2.stats.cached_tokens == last3.stats.cached_tokens == shared
    assert len(out1) == len(out2) == len(out3) == 12 and last1.stats.new_tokens == 12
    with no_reuse(target.model, draft_model.model):
        fresh = [
            _decoder(kind, target, draft_model).generate(p, params)[0] for p in (second, third)
        ]
    assert [out2, out3] == fresh


def test_a_later_turn_reuses_the_answer_too(target):
    first = encode(target, SYSTEM + "Name a colour.")
    params = SamplingParams(max_new_tokens=10)
    dec = SpeculativeDecoder(target.model, None, eos_token_ids=[])
    out1, _ = dec.generate(first, params)
    follow = first + out1 + encode(target, " Another?")
    out2, last = dec.generate(follow, params)
    assert last.stats.cached_tokens == len(first) + len(out1) - 1  # all but the newest token
    with no_reuse(target.model):
        assert (
            out2
            == SpeculativeDecoder(target.model, None, eos_token_ids=[]).generate(follow, params)[0]
        )


def test_drafter_prefill_starts_after_what_its_slot_holds(draft_model):
    model = draft_model.model
    model.prefixes.forget()
    params = SamplingParams()
    a = list(range(40, 60))
    b = list(range(40, 50)) + list(range(90, 100))
    first = ModelDrafter(model)
    calls = record_forwards(first)
    first.start(a, params)
    assert calls == [(0, 19)]
    draft = first.propose(a, 3)
    first.finish()
    second = ModelDrafter(model)
    calls = record_forwards(second)
    second.start(b, params)
    assert calls == [(10, 9)]  # b[:10] was held
    with no_reuse(model):
        fresh = ModelDrafter(model)
        fresh.start(b, params)
        expected = fresh.propose(b, 3)
    assert second.propose(b, 3).tokens == expected.tokens
    assert draft.tokens  # (the first drafted after its own prompt)


def test_target_worker_skips_what_the_slot_holds(tiny_dir, target):
    spec = TargetSpec(model=str(tiny_dir), num_slots=2, max_len=160)
    worker = TargetWorker(spec)
    fresh = TargetWorker(
        TargetSpec(model=str(tiny_dir), num_slots=2, max_len=160, prefix_cache=False)
    )
    first = encode(target, SYSTEM + "one")
    second = encode(target, SYSTEM + "two and three")
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    for w in (worker, fresh):
        w.open_session(1, SamplingParams())
        w.open_session(2, SamplingParams())
        w.step([ForwardItem(1, 0, 0, first, draft=EMPTY_DRAFT)])
    assert worker.stats()["reused_tokens"] == 0
    verdicts = [
        w.step([ForwardItem(2, 0, 0, second, draft=EMPTY_DRAFT)])[0][0] for w in (worker, fresh)
    ]
    assert worker.stats()["reused_tokens"] == shared and fresh.stats()["reused_tokens"] == 0
    assert verdicts[0].next_token == verdicts[1].next_token
    one = worker.step([ForwardItem(1, 1, 0, first[:1], draft=EMPTY_DRAFT)])[0][0]
    assert one.cached == 0 and one.next_token >= 0  # a one-token prompt is a prompt too
    # the next step decodes from the whole prompt's K/V
    nxt = [ForwardItem(2, 0, len(second), [verdicts[0].next_token], draft=EMPTY_DRAFT)]
    assert worker.step(nxt)[0][0].next_token == fresh.step(nxt)[0][0].next_token


def test_scheduler_takes_the_slot_that_holds_the_longest_start(workers, target):  # noqa: F811
    sched = make_scheduler(workers, "ar")
    worker = workers[0]
    try:
        cats = encode(target, SYSTEM + "Tell me about cats.")
        other = encode(target, "Something else entirely.")
        params = SamplingParams(max_new_tokens=8)
        a, b = sched.submit(cats, params), sched.submit(other, params)
        run([a, b])
        before = worker.stats()["reused_tokens"]
        again = sched.submit(cats[:-2] + encode(target, " dogs."), params)
        out = run([again])[0]
        assert again.slot == a.slot != b.slot
        assert worker.stats()["reused_tokens"] - before >= len(cats) - 3
        with no_reuse(target.model):
            dec = SpeculativeDecoder(
                target.model, None, eos_token_ids=list(worker.info.eos_token_ids)
            )
            assert out == dec.generate(again.prompt_ids, params)[0]
    finally:
        sched.close()


def test_a_later_turn_through_the_scheduler_reuses_the_answer(workers, target):  # noqa: F811
    """The slot keeps the finished session's verified tokens but the newest: the chat's next
    turn (prompt, answer, a new message) goes to that slot and prefills only the new part."""
    sched = make_scheduler(workers, "sd")
    try:
        first = encode(target, SYSTEM + "Name a colour.")
        params = SamplingParams(max_new_tokens=10)
        s1 = sched.submit(first, params)
        out1 = run([s1])[0]
        follow = first + out1 + encode(target, " Another?")
        s2 = sched.submit(follow, params)
        out2 = run([s2])[0]
        assert s2.slot == s1.slot
        assert s2.stats.cached_tokens == len(first) + len(out1) - 1
        with no_reuse(target.model):
            eos = list(workers[0].info.eos_token_ids)
            dec = SpeculativeDecoder(target.model, None, eos_token_ids=eos)
            assert out2 == dec.generate(follow, params)[0]
        sched.forget_prefixes()  # cold slots: the same prompt is prefilled whole
        s3 = sched.submit(follow, params)
        assert run([s3])[0] == out2 and s3.stats.cached_tokens == 0
    finally:
        sched.close()


def test_a_reused_prefix_gives_the_bits_of_a_cold_prefill(target):
    """Prompts run in forwards of at most prefill_rows tokens, within which a row's result
    does not depend on the rows beside it: reused K/V, and so the logits after them, are
    exactly a cold prefill's, however long the prompt."""
    model = target.model
    rows = model.prefill_rows()
    assert rows is not None  # distspec's CPU kernels run the fp32 tiny model
    dec = SpeculativeDecoder(model, None, eos_token_ids=[])
    prompt = [(7 * i) % 200 + 40 for i in range(2 * rows + 9)]
    other = prompt[: rows + 3] + [5, 6, 7]
    with no_reuse(model):
        stats = GenerationStats()
        cold = dec._prefill(prompt, 0, stats)
        assert stats.target_forwards == 1
    dec._prefill(other, 0, GenerationStats())
    warm = dec._prefill(prompt, rows + 3, GenerationStats())  # other's start is reused
    assert torch.equal(cold, warm)
    # one forward of the whole prompt (past the row limit: BLAS) comes close, not exact
    whole = model(
        torch.tensor([prompt]), torch.arange(len(prompt))[None], torch.tensor([0]), last=1
    )
    assert torch.allclose(whole[0], cold, atol=1e-3)


def test_no_reuse_across_tenants(workers, target):  # noqa: F811
    """Another tenant's prompt is prefilled whole even where a slot holds it (its time to first
    token would tell what the other sent); the same tenant's reuses it."""
    sched = make_scheduler(workers, "sd")
    try:
        prompt = encode(target, SYSTEM + "A secret question?")
        params = SamplingParams(max_new_tokens=4)
        runs = []
        for tenant in ("alice", "bob", "alice"):
            s = sched.submit(prompt, params, tenant=tenant)
            runs.append((run([s])[0], s.stats.cached_tokens))
        assert runs[1][1] == 0 and runs[2][1] == len(prompt) - 1
        assert runs[0][0] == runs[1][0] == runs[2][0]
    finally:
        sched.close()
