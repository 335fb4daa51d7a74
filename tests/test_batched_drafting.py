"""Drafting for many sessions in one batched forward per step gives each session the draft
its own drafter would have made alone."""

from __future__ import annotations

import pytest

from distspec.models.loader import load_model
from distspec.spec_decode.drafters import ModelDrafter, NgramDrafter
from distspec.spec_decode.drafters.batched import propose_together, read_together
from distspec.spec_decode.sampling import SamplingParams
from tiny import TINY_MAX_LEN

PROMPTS = ["Hello", "abcabcabcabc", "Once upon a time", "The quick brown fox jumps"]
KS = [4, 2, 5, 3]


def _drafters(model, check_lookup: bool) -> list[ModelDrafter]:
    return [
        ModelDrafter(
            model,
            slot,
            lookup=NgramDrafter(min_ngram=2) if check_lookup else None,
            check_lookup=check_lookup,
        )
        for slot in range(len(PROMPTS))
    ]


def _two_started(model_dir, check_lookup: bool, params_of) -> tuple[list, list, list]:
    """Two sets of drafters on two copies of the model, each drafter started on its prompt
    with params_of(i); and the prompts' tokens."""

    def model():
        return load_model(str(model_dir), max_len=TINY_MAX_LEN, num_slots=4).model

    a, b = _drafters(model(), check_lookup), _drafters(model(), check_lookup)
    tok = load_model(str(model_dir), max_len=16).tokenizer
    contexts = [tok.encode(p) for p in PROMPTS]
    for i, ctx in enumerate(contexts):
        a[i].start(ctx, params_of(i))
        b[i].start(ctx, params_of(i))
    return a, b, contexts


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("check_lookup", [False, True])
def test_drafting_together_gives_each_session_its_own_draft(
    tiny_drafter_dir, temperature, check_lookup
):
    alone, together, contexts = _two_started(
        tiny_drafter_dir, check_lookup, lambda i: SamplingParams(temperature=temperature, seed=i)
    )
    for rnd in range(4):  # rounds of verdicts: some drafts kept, some cut, a correction each
        want = [d.propose(c, k) for d, c, k in zip(alone, contexts, KS, strict=True)]
        got = propose_together(together, contexts, KS)
        assert [d.tokens for d in got] == [d.tokens for d in want], rnd
        assert all(len(d) > 0 for d in got)
        contexts = [
            c + d.tokens[: (i + rnd) % (len(d) + 1)] + [40 + i]
            for i, (c, d) in enumerate(zip(contexts, want, strict=True))
        ]


def test_drafting_together_needs_one_model(tiny_drafter_dir):
    a = ModelDrafter(load_model(str(tiny_drafter_dir), max_len=32).model)
    b = ModelDrafter(load_model(str(tiny_drafter_dir), max_len=32).model)
    with pytest.raises(ValueError, match="one model"):
        propose_together([a, b], [[1, 2], [3, 4]], [2, 2])


def test_reading_ahead_leaves_the_drafts_as_they_were(tiny_drafter_dir):
    """The server's plain rounds let drafters read what was verified (read_together): a
    later draft equals the one made without reading ahead, and its first forward then holds
    only the context's last token."""

    plain, read, contexts = _two_started(tiny_drafter_dir, False, lambda i: SamplingParams())
    # plain rounds: 6 verified tokens each while nobody drafted
    contexts = [c + [30 + i + j for j in range(6)] for i, c in enumerate(contexts)]
    read_together(read, contexts)
    assert all(d.cached == c[:-1] for d, c in zip(read, contexts, strict=True))
    steps = [d.drafting(c, 3) for d, c in zip(read, contexts, strict=True)]
    firsts = [next(s) for s in steps]
    assert [f.tokens for f in firsts] == [c[-1:] for c in contexts]
    for s in steps:
        s.close()
    want = propose_together(plain, contexts, [3] * 4)
    got = propose_together(read, contexts, [3] * 4)
    assert [d.tokens for d in got] == [d.tokens for d in want]
