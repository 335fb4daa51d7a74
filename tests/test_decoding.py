"""The decoding loop on tiny random models: exactness, stopping, limits, stats, losslessness."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from distspec.models.loader import load_model
from distspec.models.self_draft import load_self_drafter
from distspec.spec_decode import decoding
from distspec.spec_decode.decoding import SpeculativeDecoder
from distspec.spec_decode.drafter import Draft, Drafter
from distspec.spec_decode.drafters import ModelDrafter, NgramDrafter
from distspec.spec_decode.pearl import PearlDecoder
from distspec.spec_decode.sampling import SamplingParams, draw, probs_from_logits
from distspec.spec_decode.verify import Verdict
from tiny import EOS_ID, SMALL_V, TINY_MAX_LEN

PROMPTS = ["Hello", "The quick brown fox", "abcabcabcabc", "Once upon a time, there was a"]
ALPHA = 1e-3


def encode(target, text: str) -> list[int]:
    return target.tokenizer.encode(text)


def make_drafter(kind: str, draft_model) -> Drafter | None:
    if kind == "ar":
        return None
    if kind == "ngram":
        return NgramDrafter()
    if kind == "model":
        return ModelDrafter(draft_model.model)
    if kind == "lookup":  # model drafter that starts with prompt-lookup matches
        return ModelDrafter(draft_model.model, lookup=NgramDrafter(min_ngram=2))
    raise AssertionError(kind)


class OracleDrafter(Drafter):
    """Proposes the target's own greedy continuation (precomputed): every draft is accepted.

    It also checks that the decoder hands it the verified sequence so far."""

    name = "oracle"

    def __init__(self, sequence: list[int], strict: bool = True):
        self.sequence, self.strict = sequence, strict
        self.calls: list[int] = []

    def start(self, prompt_ids, params):
        self.calls = []

    def propose(self, context, k):
        if self.strict:
            assert context == self.sequence[: len(context)], "decoder context diverged"
        self.calls.append(k)
        return Draft(self.sequence[len(context) : len(context) + k])


_greedy_cache: dict[tuple[str, int], list[int]] = {}


def greedy_ar(target, prompt_ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding of the target, n tokens, no EOS (memoised)."""
    key = (repr(prompt_ids), n)
    if key not in _greedy_cache:
        dec = SpeculativeDecoder(target.model, None, eos_token_ids=[])
        out, last = dec.generate(prompt_ids, SamplingParams(max_new_tokens=n))
        assert len(out) == n and last.finish_reason == "length"
        _greedy_cache[key] = out
    return _greedy_cache[key]


# ---------------------------------------------------------------------------------------------
# greedy exactness


@pytest.mark.parametrize("gamma", [1, 2, 4, 7])
@pytest.mark.parametrize("kind", ["model", "ngram", "lookup"])
def test_greedy_sd_equals_greedy_ar(target, draft_model, kind, gamma):
    drafted = 0
    for text in PROMPTS:
        ids = encode(target, text)
        expected = greedy_ar(target, ids, 40)
        dec = SpeculativeDecoder(
            target.model, make_drafter(kind, draft_model), gamma=gamma, eos_token_ids=[]
        )
        out, last = dec.generate(ids, SamplingParams(max_new_tokens=40))
        assert out == expected, text
        assert last.finish_reason == "length"
        drafted += last.stats.draft_tokens
    assert drafted > 0  # the drafter did propose tokens (not a vacuous AR run)


def hf_greedy(hf, ids: list[int], n: int, eos: int) -> list[int]:
    """transformers' greedy generate: the new tokens only."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    return out[0, len(ids) :].tolist()


def test_greedy_matches_transformers_generate(tiny_dir, target, draft_model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).float().eval()
    lengths = []
    for text in PROMPTS:
        ids = encode(target, text)
        ref = hf_greedy(hf, ids, 48, EOS_ID)
        lengths.append(len(ref))
        for kind, gamma in [("ar", 4), ("model", 3), ("ngram", 5)]:
            dec = SpeculativeDecoder(
                target.model, make_drafter(kind, draft_model), gamma, target.tokenizer.eos_token_ids
            )
            out, last = dec.generate(ids, SamplingParams(max_new_tokens=48))
            assert out == ref, (text, kind)
            stopped_on_eos = len(ref) < 48
            assert last.finish_reason == ("stop" if stopped_on_eos else "length")
            if stopped_on_eos:
                assert out[-1] == EOS_ID
    assert sum(lengths) > 48 * 2  # long enough to be a meaningful comparison

    # stopping on EOS: make a token the greedy continuation reaches mid-way the EOS, for both
    ids = encode(target, "Once upon a time")
    greedy = greedy_ar(target, ids, 40)
    j = _fresh_index(greedy, range(12, 30))
    ref = hf_greedy(hf, ids, 40, greedy[j])
    assert ref == greedy[: j + 1]
    for kind, gamma in [("ar", 4), ("model", 3), ("ngram", 5)]:
        dec = SpeculativeDecoder(target.model, make_drafter(kind, draft_model), gamma, [greedy[j]])
        out, last = dec.generate(ids, SamplingParams(max_new_tokens=40))
        assert out == ref and last.finish_reason == "stop"


# ---------------------------------------------------------------------------------------------
# stopping


def _oracle_setup(target, text="Once upon a time", n=60):
    ids = encode(target, text)
    greedy = greedy_ar(target, ids, n)
    return ids, greedy, OracleDrafter(ids + greedy)


def _fresh_index(greedy: list[int], candidates) -> int:
    """An index j among candidates whose token does not occur earlier in greedy."""
    for j in candidates:
        if greedy[j] not in greedy[:j]:
            return j
    pytest.skip("no suitable stop token in this continuation")


@pytest.mark.parametrize("via", ["stop_token_ids", "eos_token_ids"])
def test_stop_token_inside_accepted_chunk(target, via):
    ids, greedy, oracle = _oracle_setup(target)
    # prefill gives greedy[0]; round 1 (gamma 4) emits greedy[1:6] in one chunk
    j = _fresh_index(greedy, [3, 2, 4])
    stop = greedy[j]
    params = SamplingParams(
        max_new_tokens=50, stop_token_ids=[stop] if via == "stop_token_ids" else []
    )
    eos = [stop] if via == "eos_token_ids" else []
    dec = SpeculativeDecoder(target.model, oracle, gamma=4, eos_token_ids=eos)
    steps = list(dec.stream(ids, params))
    out = [t for s in steps for t in s.token_ids]
    assert out == greedy[: j + 1]  # stop token kept, nothing after it
    assert steps[-1].finish_reason == "stop"
    assert all(s.finish_reason is None for s in steps[:-1])
    assert steps[-1].stats.target_forwards == 2
    assert steps[-1].stats.new_tokens == j + 1
    assert oracle.calls == [4]  # no further round after the stop
    # AR stops at the same place
    ar = SpeculativeDecoder(target.model, None, eos_token_ids=eos)
    out_ar, last_ar = ar.generate(ids, params)
    assert out_ar == out and last_ar.finish_reason == "stop"
    assert last_ar.stats.target_forwards == j + 1


@pytest.mark.parametrize("kind", ["ar", "model", "ngram", "oracle"])
def test_stop_on_first_token(target, draft_model, kind):
    ids, greedy, oracle = _oracle_setup(target)
    drafter = oracle if kind == "oracle" else make_drafter(kind, draft_model)
    dec = SpeculativeDecoder(target.model, drafter, gamma=4, eos_token_ids=[greedy[0]])
    out, last = dec.generate(ids, SamplingParams(max_new_tokens=20))
    assert out == greedy[:1]
    assert last.finish_reason == "stop"
    assert last.stats.target_forwards == 1


@pytest.mark.parametrize("kind", ["ar", "model", "ngram"])
def test_stop_token_later_in_generation(target, draft_model, kind):
    ids, greedy, _ = _oracle_setup(target)
    j = _fresh_index(greedy, range(10, 40))
    dec = SpeculativeDecoder(target.model, make_drafter(kind, draft_model), 3, [])
    params = SamplingParams(max_new_tokens=60, stop_token_ids=[greedy[j]])
    out, last = dec.generate(ids, params)
    assert out == greedy[: j + 1]
    assert last.finish_reason == "stop"


def test_stop_takes_precedence_over_length(target):
    ids, greedy, oracle = _oracle_setup(target)
    j = _fresh_index(greedy, [4, 3, 2])
    dec = SpeculativeDecoder(target.model, oracle, gamma=6, eos_token_ids=[greedy[j]])
    out, last = dec.generate(ids, SamplingParams(max_new_tokens=j + 1))
    assert out == greedy[: j + 1]
    assert last.finish_reason == "stop"


# ---------------------------------------------------------------------------------------------
# length limits


@pytest.mark.parametrize("max_new", [1, 2, 3, 5, 6, 8, 11, 17])
@pytest.mark.parametrize("kind, gamma", [("ar", 4), ("ngram", 4), ("model", 7), ("oracle", 4)])
def test_max_new_tokens_exact_greedy(target, draft_model, kind, gamma, max_new):
    ids, greedy, oracle = _oracle_setup(target)
    drafter = oracle if kind == "oracle" else make_drafter(kind, draft_model)
    dec = SpeculativeDecoder(target.model, drafter, gamma=gamma, eos_token_ids=[])
    out, last = dec.generate(ids, SamplingParams(max_new_tokens=max_new))
    assert out == greedy[:max_new]
    assert last.finish_reason == "length"
    assert last.stats.new_tokens == max_new
    if kind == "oracle":
        # every round fills gamma + 1 tokens, the last one only what is left: no overshoot
        assert last.stats.target_forwards == 1 + math.ceil((max_new - 1) / (gamma + 1))
        assert sum(oracle.calls) == last.stats.draft_tokens
        assert all(k <= gamma for k in oracle.calls)


@pytest.mark.parametrize("kind, gamma", [("ar", 4), ("ngram", 3), ("model", 5)])
def test_max_new_tokens_exact_sampled(target, draft_model, kind, gamma):
    ids = encode(target, "abcabcabcabc")
    for max_new in (1, 2, 7, 13):
        for seed in range(3):
            dec = SpeculativeDecoder(target.model, make_drafter(kind, draft_model), gamma, [])
            params = SamplingParams(max_new_tokens=max_new, temperature=1.0, seed=seed)
            out, last = dec.generate(ids, params)
            assert len(out) == max_new
            assert last.finish_reason == "length"


@pytest.fixture(scope="module")
def short(tiny_dir, tiny_drafter_dir):
    """The same models with a 24-position context."""
    return load_model(str(tiny_dir), max_len=24), load_model(str(tiny_drafter_dir), max_len=24)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("kind, gamma", [("ar", 1), ("ngram", 4), ("model", 7), ("oracle", 5)])
def test_context_limit_ends_with_length(short, target, kind, gamma, temperature):
    tgt, dft = short
    for prompt_len in (5, 10, 19, 22, 23):
        ids = encode(tgt, "abcabcabcabcabcabcabcabcabc")[:prompt_len]
        greedy = greedy_ar(target, ids, 40)  # same weights, larger context
        if kind == "oracle":  # keeps proposing past the context end; sampled: a point mass
            drafter = OracleDrafter(ids + greedy, strict=temperature == 0.0)
        else:
            drafter = make_drafter(kind, dft)
        dec = SpeculativeDecoder(tgt.model, drafter, gamma=gamma, eos_token_ids=[])
        params = SamplingParams(max_new_tokens=100, temperature=temperature, seed=prompt_len)
        out, last = dec.generate(ids, params)
        assert len(out) == 24 - prompt_len  # prompt + output fill the context exactly
        assert last.finish_reason == "length"
        if temperature == 0.0:
            assert out == greedy[: 24 - prompt_len]


@pytest.mark.parametrize("kind", ["ar", "ngram", "model"])
def test_prompt_too_long_or_empty_raises(short, kind):
    tgt, dft = short
    dec = SpeculativeDecoder(tgt.model, make_drafter(kind, dft), gamma=4)
    for n in (24, 30):
        with pytest.raises(ValueError, match="context"):
            dec.generate(list(range(n)), SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        dec.generate([], SamplingParams())


def test_gamma_must_be_positive(target):
    with pytest.raises(ValueError, match="gamma"):
        SpeculativeDecoder(target.model, NgramDrafter(), gamma=0)


# ---------------------------------------------------------------------------------------------
# stats


def test_ar_stats(target):
    ids = encode(target, "Hello")
    out, last = SpeculativeDecoder(target.model, None, eos_token_ids=[]).generate(
        ids, SamplingParams(max_new_tokens=20)
    )
    s = last.stats
    assert s.new_tokens == len(out) == 20
    assert s.prompt_tokens == len(ids)
    assert s.target_forwards == 20
    assert s.tokens_per_target_forward == 1.0
    assert s.draft_tokens == s.accepted_tokens == 0
    assert s.acceptance_rate == 0.0
    assert s.accepted_per_position == []
    assert s.wall_s > 0 and s.tokens_per_s > 0
    assert 0 < s.time_to_first_token_s <= s.wall_s


@pytest.mark.parametrize("gamma, rounds", [(1, 10), (4, 6), (7, 3)])
def test_oracle_stats(target, gamma, rounds):
    ids, greedy, oracle = _oracle_setup(target)
    max_new = 1 + rounds * (gamma + 1)
    dec = SpeculativeDecoder(target.model, oracle, gamma=gamma, eos_token_ids=[])
    out, last = dec.generate(ids, SamplingParams(max_new_tokens=max_new))
    s = last.stats
    assert out == greedy[:max_new]
    assert s.target_forwards == 1 + rounds
    assert s.draft_tokens == s.accepted_tokens == rounds * gamma
    assert s.acceptance_rate == 1.0
    assert s.accepted_per_position == [rounds] * gamma
    # tau = (1 + rounds * (gamma + 1)) / (1 + rounds): gamma + 1 but for the prefill
    assert s.tokens_per_target_forward == pytest.approx(gamma + 1 - gamma / (1 + rounds))
    d = s.to_dict()
    assert d["tokens_per_target_forward"] == s.tokens_per_target_forward
    assert d["acceptance_rate"] == 1.0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("kind, gamma", [("ngram", 4), ("model", 3), ("model", 6)])
def test_drafter_stats_consistent(target, draft_model, kind, gamma, temperature):
    for i, text in enumerate(PROMPTS):
        dec = SpeculativeDecoder(target.model, make_drafter(kind, draft_model), gamma, [])
        params = SamplingParams(max_new_tokens=50, temperature=temperature, seed=i)
        out, last = dec.generate(encode(target, text), params)
        s = last.stats
        assert s.new_tokens == len(out) == 50
        assert sum(s.accepted_per_position) == s.accepted_tokens
        assert len(s.accepted_per_position) <= gamma
        # a token accepted at position i implies acceptance at every earlier position
        assert s.accepted_per_position == sorted(s.accepted_per_position, reverse=True)
        assert 0 <= s.accepted_tokens <= s.draft_tokens
        # each forward yields one target token plus the accepted ones (the last maybe clipped)
        assert s.target_forwards <= s.new_tokens <= s.target_forwards + s.accepted_tokens
        if s.draft_tokens:
            assert s.acceptance_rate == s.accepted_tokens / s.draft_tokens
        assert s.tokens_per_target_forward == s.new_tokens / s.target_forwards


class Recording(Drafter):
    def __init__(self, inner: Drafter):
        self.inner, self.log = inner, []

    def start(self, prompt_ids, params):
        self.inner.start(prompt_ids, params)

    def propose(self, context, k):
        draft = self.inner.propose(context, k)
        self.log.append((len(context), k, len(draft)))
        return draft

    def finish(self):
        self.inner.finish()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_draft_length_requested_from_drafter(target, draft_model, temperature):
    """Each round asks for min(gamma, what is left - 1) tokens; a model drafter gives them all."""
    ids = encode(target, "Hello")
    rec = Recording(ModelDrafter(draft_model.model))
    dec = SpeculativeDecoder(target.model, rec, 4, [])
    out, last = dec.generate(ids, SamplingParams(max_new_tokens=30, temperature=temperature))
    assert len(out) == 30
    assert len(rec.log) >= 5
    for length, k, got in rec.log:
        produced = length - len(ids)
        assert k == min(4, 30 - produced - 1)
        assert got == k
    assert sum(got for _, _, got in rec.log) == last.stats.draft_tokens


# ---------------------------------------------------------------------------------------------
# the n-gram drafter


def reference_ngram(context, k, max_n=3, min_n=1):
    for n in range(max_n, min_n - 1, -1):
        if len(context) <= n:
            continue
        tail = context[-n:]
        for j in range(len(context) - n - 1, -1, -1):
            if context[j : j + n] == tail:
                return context[j + n : j + n + k]
    return []


def _ngram(context, k, **kw):
    d = NgramDrafter(**kw)
    d.start(context, SamplingParams())
    return d.propose(context, k).tokens


def test_ngram_finds_latest_match():
    ctx = [5, 1, 9, 7, 1, 8, 3, 6, 1]
    assert _ngram(ctx, 2, max_ngram=1) == [8, 3]
    assert _ngram(ctx, 3, max_ngram=3) == [8, 3, 6]


def test_ngram_prefers_longer_ngrams():
    ctx = [1, 2, 9, 9, 3, 2, 8, 8, 1, 2]
    assert _ngram(ctx, 2, max_ngram=1) == [8, 8]  # latest "2"
    assert _ngram(ctx, 2, max_ngram=2) == [9, 9]  # "1 2" beats the later "2"
    assert _ngram(ctx, 2, max_ngram=3) == [9, 9]
    # min_ngram 2 never falls back to single tokens
    assert _ngram([4, 2, 7, 3, 2], 2, max_ngram=3, min_ngram=2) == []
    assert _ngram([4, 2, 7, 3, 2], 2, max_ngram=3, min_ngram=1) == [7, 3]


def test_ngram_no_match_proposes_nothing():
    assert _ngram([1, 2, 3, 4, 5], 4) == []
    assert _ngram([7], 4) == []
    assert _ngram([7, 7], 3) == [7]


def test_ngram_respects_k():
    ctx = [1, 2, 3, 4, 5, 6, 7, 1, 2]
    assert _ngram(ctx, 0) == []
    assert _ngram(ctx, 1) == [3]
    assert _ngram(ctx, 4) == [3, 4, 5, 6]
    assert _ngram(ctx, 50) == [3, 4, 5, 6, 7, 1, 2]  # no more than the context holds


def test_ngram_validation():
    with pytest.raises(ValueError):
        NgramDrafter(max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError):
        NgramDrafter(max_ngram=2, min_ngram=0)


@pytest.mark.parametrize("max_n, min_n", [(3, 1), (2, 2), (4, 2)])
def test_ngram_index_stays_correct_as_context_grows(max_n, min_n):
    g = torch.Generator().manual_seed(max_n * 10 + min_n)
    seq = torch.randint(0, 4, (300,), generator=g).tolist()
    steps = torch.randint(1, 6, (300,), generator=g).tolist()
    drafter = NgramDrafter(max_ngram=max_n, min_ngram=min_n)
    drafter.start(seq[:3], SamplingParams())
    length, checked, proposed = 3, 0, 0
    for step in steps:
        if length > len(seq):
            break
        ctx = seq[:length]
        got = drafter.propose(ctx, 5).tokens
        assert got == reference_ngram(ctx, 5, max_n, min_n), length
        checked += 1
        proposed += bool(got)
        length += step
    assert checked > 50 and proposed > 40

    # start() resets: a shorter, unrelated context behaves as in a fresh drafter
    other = [3, 3, 0, 1, 2, 0, 1]
    drafter.start(other, SamplingParams())
    assert drafter.propose(other, 5).tokens == reference_ngram(other, 5, max_n, min_n)
    assert drafter.propose(other, 5).tokens == _ngram(other, 5, max_ngram=max_n, min_ngram=min_n)


def test_ngram_reset_forgets_previous_request():
    drafter = NgramDrafter(max_ngram=2)
    first = [1, 2, 3, 4, 5, 6, 1, 2]
    assert drafter.propose(first, 3).tokens == [3, 4, 5]
    drafter.start([9, 1, 2], SamplingParams())
    # "1 2" occurred in the previous request only: nothing to propose now
    assert drafter.propose([9, 1, 2], 3).tokens == []


# ---------------------------------------------------------------------------------------------
# the model drafter


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_model_drafter_resyncs_after_rejection(target, draft_model, tiny_drafter_dir, temperature):
    params = SamplingParams(temperature=temperature, seed=0)
    ctx = encode(target, "The quick brown fox")
    other = load_model(str(tiny_drafter_dir), max_len=TINY_MAX_LEN)  # its own KV cache

    def fresh(context, k):
        d = ModelDrafter(other.model)
        d.start(context, params)
        return d.propose(context, k)

    drafter = ModelDrafter(draft_model.model)
    drafter.start(ctx, params)
    first = drafter.propose(ctx, 4)
    assert len(first) == 4
    # continuations that diverge from the drafter's cache at various points
    contexts = [
        ctx + [(first.tokens[0] + 1) % 200],  # rejected at position 0
        ctx + first.tokens[:2] + [(first.tokens[2] + 7) % 200],  # rejected at 2
        ctx + first.tokens + [65],  # all accepted + bonus
        ctx + first.tokens + [65, 66, 67, 68, 69],  # all accepted, then more than one round
        # several new tokens after the divergence (the drafter skipped a round)
        ctx + [(first.tokens[0] + 1) % 200, 66, 67],
        ctx + first.tokens[:1] + [(first.tokens[1] + 5) % 200, 68],
    ]
    for c in contexts:
        # contexts grow within a request; restart the drafter on ctx to reach each one
        drafter.start(ctx, params)
        drafter.propose(ctx, 4)
        # a draft depends only on the context (and, sampled, on the seed's noise)
        assert drafter.propose(c, 4).tokens == fresh(c, 4).tokens
    # a chain of rounds in one request, each diverging from what was proposed
    drafter.start(ctx, params)
    c = list(ctx)
    for i in range(6):
        d = drafter.propose(c, 3)
        assert d.tokens == fresh(c, 3).tokens
        c = c + d.tokens[: i % 3] + [70 + i]


def record_forwards(drafter: ModelDrafter) -> list[tuple[int, int]]:
    """(start position, token count) of every forward the drafter runs from now on."""
    calls: list[tuple[int, int]] = []
    inner = drafter._forward

    def forward(step):
        calls.append((step.start, len(step.tokens)))
        return inner(step)

    drafter._forward = forward
    return calls


class FixedLookup(NgramDrafter):
    """A prompt lookup that proposes the given tokens (their first k)."""

    def __init__(self, tokens: list[int]):
        super().__init__()
        self.tokens = tokens

    def propose(self, context: list[int], k: int) -> Draft:
        return Draft(self.tokens[:k])


def own_draft(draft_model, ctx, k, params) -> Draft:
    drafter = ModelDrafter(draft_model.model)
    drafter.start(ctx, params)
    return drafter.propose(ctx, k)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_model_drafter_starts_with_lookup_match(draft_model, temperature):
    """Unchecked (a small drafter): a 2+ token match starts the draft with what followed it,
    costing no model step; the model catches up in one forward and drafts on."""
    drafter = make_drafter("lookup", draft_model)
    calls = record_forwards(drafter)
    ctx = list(range(40, 60)) + [58, 59]  # "58 59" occurred before, followed by "58 59"
    drafter.start(ctx, SamplingParams(temperature=temperature, seed=1))
    draft = drafter.propose(ctx, 4)
    assert draft.tokens[:2] == [58, 59] and len(draft.tokens) == 4
    # the prompt but its last token read at start; then the rest and the lookup tokens
    assert calls == [(0, 21), (21, 3), (24, 1)]
    calls.clear()
    assert drafter.propose(list(range(70, 80)), 2).tokens  # no match: the model alone
    assert calls == [(0, 10), (10, 1)]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_model_drafter_keeps_looked_up_tokens_as_far_as_it_agrees(draft_model, temperature):
    """The draft is the model's own whatever the lookup says (greedy: its argmax; sampled: its
    draws with the request's noise); the looked-up tokens are read in the forward that reads
    the new verified ones, and the model drafts on from the first it disagrees with, whose
    prediction that forward already made."""
    ctx = list(range(40, 62))
    params = SamplingParams(temperature=temperature, seed=1)
    own = own_draft(draft_model, ctx, 4, params).tokens
    wrong = (own[2] + 1) % 200
    for looked_up, expected_calls in [
        (own[:2] + [wrong], [(0, 21), (21, 4), (24, 1)]),  # 2 kept, one step saved
        (own, [(0, 21), (21, 5)]),  # all kept: one forward for the whole draft
        ([(own[0] + 1) % 200], [(0, 21), (21, 2), (22, 1), (23, 1), (24, 1)]),  # none kept
    ]:
        drafter = ModelDrafter(draft_model.model, lookup=FixedLookup(looked_up), check_lookup=True)
        calls = record_forwards(drafter)
        draft_model.model.prefixes.forget()  # its slot held ctx's start: prefilled again
        drafter.start(ctx, params)
        assert drafter.propose(ctx, 4).tokens == own
        assert calls == expected_calls, looked_up


def test_model_drafter_reuses_its_cache(draft_model):
    """Only tokens past the common prefix with the drafter's cache are forwarded again."""
    params = SamplingParams()
    drafter = ModelDrafter(draft_model.model)
    calls = record_forwards(drafter)
    ctx = list(range(40, 60))
    draft_model.model.prefixes.forget()
    drafter.start(ctx, params)
    first = drafter.propose(ctx, 4)
    assert calls == [(0, 19), (19, 1), (20, 1), (21, 1), (22, 1)]  # (0, 19): at start
    calls.clear()
    # accepted 2, then a correction: only the correction is new
    c = ctx + first.tokens[:2] + [(first.tokens[2] + 1) % 200]
    t0 = drafter.propose(c, 2).tokens[0]
    assert calls == [(22, 1), (23, 1)]  # the cache now holds c + [t0]
    calls.clear()
    # t0 accepted, then two more: the cached t0 is reused
    drafter.propose(c + [t0, 11, 12], 1)
    assert calls == [(len(c) + 1, 2)]
    calls.clear()
    # divergence two tokens before the end: all three new tokens are forwarded
    drafter.propose(c + [t0, 13, 14, 15], 1)
    assert calls == [(len(c) + 1, 3)]


@pytest.mark.parametrize("seed", range(5))
def test_common_prefix(seed):
    from distspec.models.prefix_cache import common_prefix

    g = torch.Generator().manual_seed(seed)
    for _ in range(200):
        n = int(torch.randint(0, 12, (1,), generator=g))
        a = torch.randint(0, 3, (n,), generator=g).tolist()
        b = a[: int(torch.randint(0, n + 1, (1,), generator=g))]
        b = (
            b
            + torch.randint(
                0, 3, (int(torch.randint(0, 5, (1,), generator=g)),), generator=g
            ).tolist()
        )
        limit = int(torch.randint(0, 14, (1,), generator=g))
        expected = 0
        while expected < min(len(a), len(b), limit) and a[expected] == b[expected]:
            expected += 1
        assert common_prefix(a, b, limit) == expected, (a, b, limit)


def test_model_drafter_respects_context(short):
    _, dft = short
    drafter = ModelDrafter(dft.model)
    drafter.start([1, 2], SamplingParams())
    assert len(drafter.propose(list(range(20)), 10)) == 4  # 24 - 20
    assert len(drafter.propose(list(range(24)), 3)) == 0
    assert len(drafter.propose(list(range(5)), 0)) == 0


# ---------------------------------------------------------------------------------------------
# sampling losslessness, end to end (statistical)
#
# A tiny model with an 8-token vocabulary makes the joint distribution of the first three new
# tokens (512 outcomes) small enough to compute exactly and to test with a few thousand
# samples. Token 1 comes from the prefill; tokens 2 and 3 are the two drafted positions of the
# first round (max_new_tokens=4 leaves room for a 2-token draft plus the bonus).

SMALL_PROMPT = [1, 2, 3, 1, 2]
SAMPLES = 3000


def exact_joint(model, prompt, params) -> dict[tuple[int, ...], float]:
    """P(t1, t2, t3) of the target under params, from its logits (float64)."""
    joint: dict[tuple[int, ...], float] = {}
    for a in range(SMALL_V):
        for b in range(SMALL_V):
            seq = prompt + [a, b]
            logits = model(torch.tensor([seq]), torch.arange(len(seq))[None])[0, -3:]
            p = probs_from_logits(logits, params).double()
            for c in range(SMALL_V):
                joint[(a, b, c)] = float(p[0, a] * p[1, b] * p[2, c])
    total = sum(joint.values())
    return {k: v / total for k, v in joint.items()}


def sample_outcomes(
    model, drafter, params, seeds, gamma=3, decoder_cls=SpeculativeDecoder, **decoder_kw
) -> tuple[Counter, dict]:
    """Counts of the first 3 generated tokens over seeds, and draft/accepted totals."""
    dec = decoder_cls(model, drafter, gamma=gamma, eos_token_ids=[], **decoder_kw)
    counts: Counter = Counter()
    totals = Counter()
    for seed in seeds:
        p = SamplingParams(
            max_new_tokens=4,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            seed=seed,
        )
        out, last = dec.generate(SMALL_PROMPT, p)
        counts[tuple(out[:3])] += 1
        totals["draft"] += last.stats.draft_tokens
        totals["accepted"] += last.stats.accepted_tokens
    return counts, totals


def gof_pvalue(counts: Counter, probs: dict, min_expected: float = 5.0) -> float:
    """Chi-square goodness of fit; cells expected below min_expected are pooled."""
    n = sum(counts.values())
    impossible = [k for k in counts if probs.get(k, 0.0) == 0.0]
    assert not impossible, f"outcomes of probability 0 were sampled: {impossible}"
    big = [k for k, v in probs.items() if v * n >= min_expected]
    obs = [counts[k] for k in big]
    exp = [probs[k] * n for k in big]
    rest_obs, rest_exp = n - sum(obs), n - sum(exp)
    if rest_exp > 0:
        obs.append(rest_obs)
        exp.append(rest_exp)
    return float(chisquare(obs, exp).pvalue)


def marginal(counts_or_probs, position: int) -> dict:
    out: dict = {}
    for k, v in counts_or_probs.items():
        out[(k[position],)] = out.get((k[position],), 0) + v
    return out


SEED_BASE = {"ar": 0, "model": 100_000, "ngram": 200_000, "lookup": 400_000}


@pytest.fixture(scope="module")
def t1_samples(small):
    """Temperature 1.0: joint counts per mode and the exact distribution (disjoint seeds: the
    same seed gives every mode the same tokens)."""
    tgt, dft = small
    params = SamplingParams(temperature=1.0)
    exact = exact_joint(tgt.model, SMALL_PROMPT, params)
    samples = {}
    drafters = {"ar": None, **{k: make_drafter(k, dft) for k in ("model", "ngram", "lookup")}}
    for kind, drafter in drafters.items():
        seeds = range(SEED_BASE[kind], SEED_BASE[kind] + SAMPLES)
        samples[kind] = sample_outcomes(tgt.model, drafter, params, seeds)
    return exact, samples


# chi-square over thousands of sampled runs: minutes on 2 cores (make test runs it; test-fast
# keeps the verifier's own statistical tests, test_verify.py)
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ar", "model", "ngram", "lookup"])
def test_sampling_matches_exact_target_distribution(t1_samples, kind):
    exact, samples = t1_samples
    counts, totals = samples[kind]
    if kind != "ar":
        # both the acceptance and the rejection paths were exercised, many times
        assert totals["draft"] > SAMPLES
        assert 0.1 * totals["draft"] < totals["accepted"] < 0.9 * totals["draft"]
    p_joint = gof_pvalue(counts, exact)
    p_first = gof_pvalue(marginal(counts, 0), marginal(exact, 0))
    p_second = gof_pvalue(marginal(counts, 1), marginal(exact, 1))
    p_third = gof_pvalue(marginal(counts, 2), marginal(exact, 2))
    print(
        f"e2e t=1 {kind}: joint p={p_joint:.4g}, t1 p={p_first:.4g}, "
        f"t2 p={p_second:.4g}, t3 p={p_third:.4g}"
    )
    for p in (p_joint, p_first, p_second, p_third):
        assert p > ALPHA


@pytest.mark.parametrize("kind", ["model", "ngram", "lookup"])
def test_sampled_sd_and_pearl_give_ar_tokens_for_the_same_seed(small, kind):
    """The verifier emits the target's own draw at each position: speculating (any drafter,
    any draft length, PEARL) gives the tokens plain decoding gives with the same seed."""
    tgt, dft = small
    ar = SpeculativeDecoder(tgt.model, None, eos_token_ids=[])
    sd = SpeculativeDecoder(tgt.model, make_drafter(kind, dft), gamma=3, eos_token_ids=[])
    pearl = PearlDecoder(tgt.model, make_drafter(kind, dft), gamma=2, eos_token_ids=[])
    accepted = 0
    for seed in range(60):
        params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=seed)
        want = ar.generate(SMALL_PROMPT, params)[0]
        got, last = sd.generate(SMALL_PROMPT, params)
        assert got == want, seed
        assert pearl.generate(SMALL_PROMPT, params)[0] == want, seed
        accepted += last.stats.accepted_tokens
    assert accepted > 0


# the dense-q model drafter under every filter; the point-mass drafters under one each (a
# covering set: the verifier is shared, test_verify.py crosses every filter with both q kinds)
FILTERS = {
    "top_k3": SamplingParams(temperature=1.0, top_k=3),
    "top_p0.7": SamplingParams(temperature=1.0, top_p=0.7),
    "t0.7_k5_p0.9": SamplingParams(temperature=0.7, top_k=5, top_p=0.9),
}
FILTER_CASES = [("model", f) for f in FILTERS] + [("ngram", "t0.7_k5_p0.9"), ("lookup", "top_k3")]


# chi-square over thousands of sampled runs: minutes on 2 cores (make test runs it; test-fast
# keeps the verifier's own statistical tests, test_verify.py)
@pytest.mark.slow
@pytest.mark.parametrize("kind, filters", FILTER_CASES, ids=[f"{k}-{f}" for k, f in FILTER_CASES])
def test_sampling_filters_lossless(small, kind, filters):
    tgt, dft = small
    params = FILTERS[filters]
    exact = exact_joint(tgt.model, SMALL_PROMPT, params)
    assert sum(v == 0 for v in exact.values()) > 100  # the filters do cut the distribution
    drafter = make_drafter(kind, dft)
    seeds = range(300_000, 300_000 + SAMPLES // 2)
    counts, totals = sample_outcomes(tgt.model, drafter, params, seeds)
    assert totals["draft"] > 0 and 0 < totals["accepted"] < totals["draft"]
    pvalue = gof_pvalue(counts, exact)  # also: no outcome of probability 0 sampled
    label = f"t={params.temperature} top_k={params.top_k} top_p={params.top_p}"
    print(f"e2e {label} {kind}: joint p={pvalue:.4g}")
    assert pvalue > ALPHA


@pytest.mark.slow  # chi-square over sampled runs, as above
@pytest.mark.parametrize("form", ["int4", "int8", "int4-engine"])
def test_sampling_with_a_self_drafter_matches_the_target(small, form):
    """A quantized copy of the target drafts sampled tokens with its own (dense) q; as the
    engine runs it (int4-engine): with prompt lookup, reading the target's K/V."""
    tgt, _ = small
    params = SamplingParams(temperature=0.7)
    exact = exact_joint(tgt.model, SMALL_PROMPT, params)
    copy = load_self_drafter(tgt, form.removesuffix("-engine"), max_len=32).model
    if form.endswith("-engine"):
        drafter = ModelDrafter(
            copy, lookup=NgramDrafter(min_ngram=2), target_kv=(tgt.model, 0), check_lookup=True
        )
    else:
        drafter = ModelDrafter(copy)
    seeds = range(500_000, 500_000 + SAMPLES // 2)
    counts, totals = sample_outcomes(tgt.model, drafter, params, seeds)
    assert 0 < totals["accepted"] < totals["draft"]  # both verifier paths ran
    pvalue = gof_pvalue(counts, exact)
    print(f"e2e t=0.7 self-{form}: joint p={pvalue:.4g}, accepted {totals['accepted']}")
    assert pvalue > ALPHA


def test_chi_square_detects_always_accepting_verifier(small, monkeypatch):
    """Power check: a decoder whose verifier accepts every draft is caught by the same test."""
    tgt, dft = small
    params = SamplingParams(temperature=1.0)
    exact = exact_joint(tgt.model, SMALL_PROMPT, params)

    def accept_all(logits, draft, params, pos):
        p = probs_from_logits(logits, params)
        k = len(draft)
        return Verdict(k, int(draw(p[k], params.seed, pos + k)[0]))

    monkeypatch.setattr(decoding, "verify", accept_all)
    counts, _ = sample_outcomes(tgt.model, ModelDrafter(dft.model), params, range(1000))
    pvalue = gof_pvalue(counts, exact)
    print(f"e2e power check (always accept): p={pvalue:.3g}")
    assert pvalue < 1e-6


def test_same_seed_same_output(target, draft_model):
    ids = encode(target, "Hello")
    for kind in ("ar", "model", "ngram"):
        outs = []
        for seed in (3, 3, 4):
            dec = SpeculativeDecoder(target.model, make_drafter(kind, draft_model), 4, [])
            params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=seed)
            outs.append(dec.generate(ids, params)[0])
        assert outs[0] == outs[1]
        assert outs[0] != outs[2]
