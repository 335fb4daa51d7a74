"""Token trees: the tree attention (kernel and PyTorch paths), the verifier's walk, the K/V
moved into place, and decoding with tree drafts equal to plain decoding (greedy and seeded)."""

from __future__ import annotations

import random

import pytest
import torch

from distspec.models import llama
from distspec.models.cpu_kernels import kernels
from distspec.spec_decode import tree
from distspec.spec_decode.decoding import SpeculativeDecoder
from distspec.spec_decode.drafter import Draft, Drafter
from distspec.spec_decode.drafters import ModelDrafter, RecycleDrafter, SuffixDrafter, SuffixStore
from distspec.spec_decode.sampling import SamplingParams
from distspec.spec_decode.verify import verify
from test_decoding import (
    ALPHA,
    SAMPLES,
    SMALL_PROMPT,
    encode,
    exact_joint,
    gof_pvalue,
    greedy_ar,
    sample_outcomes,
)
from tiny import SMALL_V

# root -> a, b; a -> c, d; d -> e; b -> f
PARENTS = [-1, -1, 0, 0, 3, 1]


def test_tree_helpers():
    assert tree.depths(PARENTS) == [1, 1, 2, 2, 3, 2]
    mask = tree.attention_mask(PARENTS)
    assert mask[5].nonzero().flatten().tolist() == [0, 1, 4, 5]  # e: root, a, d, itself
    assert mask[6].nonzero().flatten().tolist() == [0, 2, 6]  # f: root, b, itself
    assert tree.children(PARENTS, [7, 8, 9, 9, 5, 6]) == {
        -1: {7: 0, 8: 1},
        0: {9: 2},
        3: {5: 4},
        1: {6: 5},
    }
    assert tree.accepted_rows(10, [1, 5]) == ([12, 16], [11, 12])
    options = {(): [(1, 0.6), (5, 0.3)], (1,): [(2, 0.9), (4, 0.1)], (1, 2): [(3, 0.5)]}
    grow = lambda path: options.get(tuple(path), [])  # noqa: E731
    # best first by path chance: 1 (.6), 1-2 (.54), 5 (.3), 1-2-3 (.27), 1-4 (.06)
    assert tree.best_first(grow, 10, 5, width=2) == ([1, 2, 5, 3, 4], [-1, 0, -1, 1, 0])
    assert tree.best_first(grow, 10, 5, (0.28,), 2) == ([1, 2, 5], [-1, 0, -1])
    assert tree.best_first(grow, 2, 5, width=2) == ([1, 2], [-1, 0])
    assert tree.best_first(grow, 10, 1) == ([1], [-1])
    assert tree.best_first(grow, 10, 5) == ([1, 2, 3], [-1, 0, 1])  # width 1: a chain
    with pytest.raises(ValueError, match="parent"):
        Draft([1, 2], [-1, 1])
    assert not Draft([1, 2, 3], [-1, 0, 1]).is_tree  # a chain stays a chain
    assert Draft([1, 2, 3], PARENTS[:3])[:2].tokens == [1, 2]
    with pytest.raises(ValueError, match="tree"):
        Draft([1, 2, 3], PARENTS[:3]) + Draft([4])


def test_verifier_walks_the_tree_greedy():
    tokens = [7, 8, 9, 3, 5, 6]  # a b c d e f
    logits = torch.zeros(7, 10)
    choice = {0: 7, 1: 3, 4: 5, 5: 2}  # root -> a, a -> d (second child), d -> e, e -> 2
    for row, tok in choice.items():
        logits[row, tok] = 1.0
    verdict = verify(logits, Draft(tokens, PARENTS), SamplingParams(), pos=20)
    assert verdict.path == [0, 3, 4] and verdict.next_token == 2
    assert verdict.tokens(Draft(tokens, PARENTS)) == [7, 3, 5, 2]
    logits[0] = 0
    logits[0, 4] = 1.0  # the root's choice is no child: a correction only
    verdict = verify(logits, Draft(tokens, PARENTS), SamplingParams(), pos=20)
    assert verdict.path == [] and verdict.next_token == 4


def reference_tree_attention(q, k_cache, v_cache, slot, start, mask):
    kv_len = start + mask.shape[0]
    visible = torch.zeros(mask.shape[0], kv_len, dtype=torch.bool)
    visible[:, :start] = True
    visible[:, start:] = mask
    k, v = k_cache[slot : slot + 1, :, :kv_len], v_cache[slot : slot + 1, :, :kv_len]
    y = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, attn_mask=visible, enable_gqa=True
    )
    return y.transpose(1, 2)


@pytest.mark.skipif(kernels() is None, reason="needs an AVX2 CPU and g++")
def test_attend_follows_the_tree():
    from distspec.models.rope import apply_rope

    g = torch.Generator().manual_seed(0)
    k_cache, v_cache = (
        torch.randn(2, 2, 40, 16, generator=g),
        torch.randn(2, 2, 40, 16, generator=g),
    )
    mask = tree.attention_mask(PARENTS)
    t, start = mask.shape[0], 11
    qkv = torch.randn(1, t, 6 + 4, 16, generator=g)
    cos, sin = torch.randn(1, t, 1, 16, generator=g), torch.randn(1, t, 1, 16, generator=g)
    pos = torch.arange(start, start + t)[None]
    qk = apply_rope(qkv[:, :, :8], cos, sin)
    want_k = k_cache.clone()
    want_k[1, :, start : start + t] = qk[0, :, 6:].transpose(0, 1)
    got = kernels().attend(
        qkv, cos, sin, k_cache, v_cache, torch.tensor([1]), pos, 6, 0, mask[None]
    )
    assert torch.equal(k_cache, want_k)
    ref = reference_tree_attention(qk[:, :, :6], k_cache, v_cache, 1, start, mask)
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("path", ["kernels", "pytorch"])
def test_each_tree_node_gets_the_logits_of_its_own_path(target, monkeypatch, path):
    """One tree forward == a chain forward of each node's path, and after the accepted
    path's K/V are moved into place the next step equals plain decoding's."""
    if path == "pytorch":
        monkeypatch.setattr(llama, "decode_ops", lambda x: None)
    model = target.model
    prompt = encode(target, "The quick brown fox")
    tokens = [10, 20, 30, 40, 50, 60]
    slot = torch.tensor([0])

    def chain_logits(seq):
        model(torch.tensor([seq[:-1]]), torch.arange(len(seq) - 1)[None], slot)
        return model(torch.tensor([seq[-1:]]), torch.tensor([[len(seq) - 1]]), slot)[0, -1]

    start = len(prompt) - 1
    model(torch.tensor([prompt[:-1]]), torch.arange(start)[None], slot)
    mask = tree.attention_mask(PARENTS)
    chunk = [prompt[-1], *tokens]
    got = model(
        torch.tensor([chunk]), torch.arange(start, start + len(chunk))[None], slot, tree=mask[None]
    )[0]
    for node in range(len(tokens)):
        seq, n = [], node
        while n >= 0:
            seq.insert(0, tokens[n])
            n = PARENTS[n]
        want = chain_logits(prompt + seq)
        assert torch.allclose(got[node + 1], want, atol=1e-4), node
    # accept a -> d -> e (nodes 0, 3, 4): move them into place, then one more step
    model(torch.tensor([prompt[:-1]]), torch.arange(start)[None], slot)
    model(
        torch.tensor([chunk]), torch.arange(start, start + len(chunk))[None], slot, tree=mask[None]
    )
    model.move_kv(0, *tree.accepted_rows(start, [0, 3, 4]))
    seq = prompt + [10, 40, 50]
    nxt = model(torch.tensor([[77]]), torch.tensor([[len(seq)]]), slot)[0, -1]
    assert torch.allclose(nxt, chain_logits(seq + [77]), atol=1e-4)


class OracleTreeDrafter(Drafter):
    """Random trees holding the true continuation up to a random depth on a random branch
    (the test knows plain decoding's output), random tokens elsewhere."""

    name = "oracle-tree"

    def __init__(self, expected: list[int], prompt_len: int, seed: int = 0):
        self.expected, self.prompt_len = expected, prompt_len
        self.rng = random.Random(seed)

    def start(self, prompt_ids, params) -> None:
        return None

    def propose(self, context, k):
        truth = self.expected[len(context) - self.prompt_len :][: self.rng.randint(0, k)]
        tokens, parents = [], []
        for _ in range(self.rng.randint(0, 2 * k)):
            tokens.append(self.rng.randrange(200))
            parents.append(self.rng.randint(-1, len(tokens) - 2))
        parent = -1
        for tok in truth:  # the true path, interleaved among the random nodes
            at = self.rng.randint(parent + 1, len(tokens))
            tokens.insert(at, tok)
            parents.insert(at, parent)
            parents = [p + 1 if p >= at and i != at else p for i, p in enumerate(parents)]
            parent = at
        return Draft(tokens, parents)


def tree_drafter(kind: str, draft_model, target, expected=None, prompt_len=0) -> Drafter:
    if kind == "oracle":
        return OracleTreeDrafter(expected, prompt_len)
    if kind == "model":
        return ModelDrafter(draft_model.model, tree_width=3)
    if kind == "suffix":
        return SuffixDrafter(SuffixStore(), tree_width=3)
    if kind == "recycle":
        return RecycleDrafter(target.model.config.vocab_size, tree_width=3)
    raise AssertionError(kind)


def watch_drafts(drafter: Drafter) -> list[Draft]:
    """The drafts drafter proposes from now on."""
    seen: list[Draft] = []
    propose = drafter.propose

    def watched(context, k):
        seen.append(propose(context, k))
        return seen[-1]

    drafter.propose = watched
    return seen


@pytest.mark.parametrize("kind", ["oracle", "model", "suffix", "recycle"])
def test_greedy_with_tree_drafts_equals_greedy_ar(target, draft_model, kind):
    trees = accepted = 0
    for text in ["Hello", "abcabcabcabc", "Once upon a time, there was a"]:
        ids = encode(target, text)
        expected = greedy_ar(target, ids, 40)
        drafter = tree_drafter(kind, draft_model, target, expected, len(ids))
        seen = watch_drafts(drafter)
        dec = SpeculativeDecoder(target.model, drafter, gamma=4, eos_token_ids=[])
        for _ in range(2):  # twice: the suffix store and the recycle table now hold the text
            out, last = dec.generate(ids, SamplingParams(max_new_tokens=40))
            assert out == expected, text
        trees += sum(d.is_tree for d in seen)
        accepted += last.stats.accepted_tokens
    assert accepted > 0
    # the tiny model's text repeats itself: every match is continued one way, so no branches
    assert trees > 0 or kind == "suffix"


def test_suffix_drafts_the_most_frequent_continuation_of_the_longest_match():
    ctx = [1, 2, 3, 7, 8, 0, 1, 2, 3, 5, 6, 0, 4, 2, 3, 9, 0, 1, 2, 3, 7, 8, 0, 1, 2, 3]
    params = SamplingParams()
    chain = SuffixDrafter(max_match=3)
    chain.start(ctx[:5], params)
    # "1 2 3" was followed by 7 8 0 1 twice, by 5 6 once; at the prior chance of 0.6 a
    # token, the fourth falls below MIN_SHARE
    assert chain.propose(ctx, 4).tokens == [7, 8, 0]
    longer = SuffixDrafter(max_match=5)  # "0 1 2 3": once each, the tie goes either way
    longer.start(ctx[:5], params)
    assert longer.propose(ctx, 2).tokens in ([7, 8], [5, 6])
    wide = SuffixDrafter(max_match=3, tree_width=2)
    wide.start(ctx[:5], params)
    draft = wide.propose(ctx, 2)
    assert draft.is_tree
    paths = {tuple(draft.tokens[i] for i in _path(draft.parents, n)) for n in range(len(draft))}
    assert {(7,), (7, 8), (5,), (5, 6)} <= paths
    assert len(draft) <= 2 * 2


def _path(parents, node):
    out = []
    while node >= 0:
        out.insert(0, node)
        node = parents[node]
    return out


def test_node_calibration_learns_from_the_verdicts():
    from distspec.spec_decode.drafters.calibration import NodeCalibration

    cal = NodeCalibration(2, prior=0.5)
    # root -> a (bucket 0), b (bucket 1); a -> c (bucket 0); b -> d (bucket 1)
    draft = Draft([10, 11, 12, 13], [-1, -1, 0, 1])
    cal.drafted(5, draft, [0, 1, 0, 1])
    cal.verified([0] * 5 + [10, 99])  # a accepted, then c rejected (99 came instead)
    # tried: a (hit), b (miss), c (miss); d was under a rejected node: no evidence
    assert cal.hits == [1, 0] and cal.tries == [2, 1]
    assert cal.rate(0) == pytest.approx((1 + 1) / (2 + 2))


def test_suffix_store_drafts_from_earlier_outputs_and_evicts_the_oldest():
    store = SuffixStore(max_tokens=40)
    params = SamplingParams()
    first = SuffixDrafter(store, output_prefix=2)
    first.start([50, 51, 52], params)
    first.propose([50, 51, 52, 10, 11, 12, 13, 14, 15], 4)
    first.finish()  # stores 51 52 10 .. 15: the output and 2 prompt tokens before it
    assert store.num_tokens == 8
    later = SuffixDrafter(store)
    later.start([60, 51, 52], params)
    assert later.propose([60, 51, 52], 3).tokens == [10, 11, 12]
    for n in range(6):  # 48 tokens more than fit: the first output goes
        store.add([100 + n] * 8)
    assert store.num_tokens <= 40
    later.start([60, 51, 52], params)
    assert later.propose([60, 51, 52], 3).tokens == []


@pytest.mark.parametrize("kind", ["model", "suffix", "recycle"])
def test_sampled_tree_decoding_gives_ar_tokens_for_the_same_seed(small, kind):
    tgt, dft = small
    ar = SpeculativeDecoder(tgt.model, None, eos_token_ids=[])
    drafter = tree_drafter(kind, dft, tgt)
    sd = SpeculativeDecoder(tgt.model, drafter, gamma=3, eos_token_ids=[])
    accepted = 0
    for seed in range(40):
        params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=seed)
        want = ar.generate(SMALL_PROMPT, params)[0]
        got, last = sd.generate(SMALL_PROMPT, params)
        assert got == want, seed
        accepted += last.stats.accepted_tokens
    assert accepted > 0


# dense candidates (a model's runners-up) and point-mass ones (the recycle table's)
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model", "recycle"])
def test_tree_sampling_matches_exact_target_distribution(small, kind):
    tgt, dft = small
    params = SamplingParams(temperature=1.0)
    exact = exact_joint(tgt.model, SMALL_PROMPT, params)
    drafter = tree_drafter(kind, dft, tgt)
    if kind == "recycle":  # fill the table first (it outlives requests)
        sample_outcomes(tgt.model, drafter, params, range(20))
    seeds = range(600_000, 600_000 + SAMPLES)
    counts, totals = sample_outcomes(tgt.model, drafter, params, seeds)
    assert 0 < totals["accepted"] < totals["draft"]
    pvalue = gof_pvalue(counts, exact)
    print(f"e2e t=1 tree-{kind}: joint p={pvalue:.4g}, accepted {totals['accepted']}")
    assert pvalue > ALPHA
    assert SMALL_V == 8


def test_a_tensor_parallel_target_moves_accepted_paths_on_every_rank(tiny_dir, target):
    """Two target ranks (gloo, processes of their own): each round's accepted tree path is on
    the second branch, so its K/V must move; the rounds after read them on both ranks."""
    from distspec.spec_decode.drafter import EMPTY_DRAFT
    from distspec.workers.local_group import LocalGroup
    from distspec.workers.messages import ForwardItem
    from distspec.workers.target import TargetSpec, TargetWorker

    group = LocalGroup(TargetWorker, TargetSpec(str(tiny_dir), num_slots=2, max_len=160), 2)
    try:
        worker = group.leader
        ids = encode(target, "Once upon a time")
        expected = greedy_ar(target, ids, 12)
        worker.open_session(1, SamplingParams())
        (verdict,), _ = worker.step([ForwardItem(1, 1, 0, ids, draft=EMPTY_DRAFT)])
        out = [verdict.next_token]
        tokens = ids + out
        for _ in range(3):
            a, b = expected[len(out) : len(out) + 2]
            draft = Draft([(a + 1) % 200, a, b], [-1, -1, 1])  # a wrong first child
            chunk = [tokens[-1], *draft.tokens]
            (verdict,), _ = worker.step([ForwardItem(1, 1, len(tokens) - 1, chunk, draft=draft)])
            assert verdict.path == [1, 2]
            new = verdict.tokens(draft)
            out += new
            tokens += new
        assert out == expected[: len(out)] and len(out) == 10
    finally:
        group.close()


def test_suffix_prefers_the_newest_version_of_an_edited_text():
    """An edit's newest version is what gets copied: "1 2 3" went on with 7 twice, then with
    5 most recently; the newest weighs more than the two older ones together."""
    ctx = [1, 2, 3, 7, 0, 1, 2, 3, 7, 0, 1, 2, 3, 5, 0, 1, 2, 3]
    drafter = SuffixDrafter(max_match=3)
    drafter.start(ctx[:4], SamplingParams())
    assert drafter.propose(ctx, 1).tokens == [5]


def test_node_calibration_ages_its_verdicts():
    from distspec.spec_decode.drafters.calibration import NodeCalibration

    steady = NodeCalibration(1, prior=0.5, weight=0.0)
    ageing = NodeCalibration(1, prior=0.5, weight=0.0, decay=0.5)
    for cal in (steady, ageing):
        for accepted in [False] * 6 + [True] * 2:  # a miss streak, then a copy streak
            cal.drafted(0, Draft([9]), [0])
            cal.verified([9] if accepted else [8])
    assert steady.rate(0) == pytest.approx(2 / 8)
    assert ageing.rate(0) > 0.7  # the last verdicts count most
