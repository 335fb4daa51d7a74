"""EasySpec's fuzzy drafting (layer groups whose attentions share an input) and its KV
calibration, on tiny random models: lossless, and calibrated K/V equal exact ones."""

from __future__ import annotations

import json

import pytest
import torch

from distspec.models.llama import easyspec_groups
from distspec.models.loader import load_model
from distspec.spec_decode.decoding import SpeculativeDecoder
from distspec.spec_decode.drafters import ModelDrafter
from distspec.spec_decode.pearl import PearlDecoder
from distspec.spec_decode.sampling import SamplingParams
from test_decoding import PROMPTS, encode, greedy_ar
from tiny import make_tiny_model_dir


@pytest.fixture(scope="module")
def deep_drafter(tmp_path_factory):
    """A 6-layer drafter with the tiny target's tokenizer: room for groups of 2 to 4."""
    path = make_tiny_model_dir(tmp_path_factory.mktemp("deep") / "d", num_layers=6, seed=3)
    return str(path)


def test_groups():
    assert easyspec_groups(30, 4) == (
        (1, 5),
        (5, 9),
        (9, 13),
        (13, 17),
        (17, 21),
        (21, 25),
        (25, 29),
    )
    assert easyspec_groups(6, 2) == ((1, 3), (3, 5))
    assert easyspec_groups(6, 3) == ((1, 4),)
    assert easyspec_groups(6, 1) == () and easyspec_groups(2, 2) == ()


def test_fuzzy_forward_differs_but_stays_close(deep_drafter):
    model = load_model(deep_drafter, max_len=64).model
    tokens = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(20)[None]
    exact = model(tokens, pos)
    fuzzy = model(tokens, pos, fuzzy_groups=easyspec_groups(6, 2))
    assert not torch.allclose(exact, fuzzy)
    # a single-layer "group" is the exact computation
    same = model(tokens, pos, fuzzy_groups=((2, 3),))
    torch.testing.assert_close(same, exact)


@pytest.mark.parametrize("engine", [SpeculativeDecoder, PearlDecoder])
@pytest.mark.parametrize("group", [2, 4])
def test_fuzzy_drafting_is_lossless_greedy(target, deep_drafter, group, engine):
    model = load_model(deep_drafter, max_len=256).model
    drafter = ModelDrafter(model, fuzzy_groups=easyspec_groups(6, group))
    for text in PROMPTS:
        ids = encode(target, text)
        dec = engine(target.model, drafter, 4, eos_token_ids=[])
        out, last = dec.generate(ids, SamplingParams(max_new_tokens=30))
        assert out == greedy_ar(target, ids, 30)
        assert last.stats.draft_tokens > 0


def kv(model, slot: int, n: int) -> list[torch.Tensor]:
    return [layer.attn.kv_cache.k[slot, :, :n].clone() for layer in model.layers] + [
        layer.attn.kv_cache.v[slot, :, :n].clone() for layer in model.layers
    ]


def test_calibration_makes_verified_kv_exact(deep_drafter):
    """After a draft, the next one first runs exactly over the tokens verified since: the
    K/V of every position before the new context's end equal an exact drafter's."""
    fuzzy_model = load_model(deep_drafter, max_len=64).model
    exact_model = load_model(deep_drafter, max_len=64).model
    fuzzy = ModelDrafter(fuzzy_model, fuzzy_groups=easyspec_groups(6, 2))
    exact = ModelDrafter(exact_model)
    context = list(range(40, 52))
    for d in (fuzzy, exact):
        d.start(context, SamplingParams())
    draft = fuzzy.propose(context, 5)
    exact.propose(context, 5)
    n = len(context) + 4  # the fed draft tokens' K/V came from fuzzy steps
    assert not all(
        torch.allclose(a, b, atol=1e-5)
        for a, b in zip(kv(fuzzy_model, 0, n), kv(exact_model, 0, n), strict=True)
    )
    # the verifier accepted 3 draft tokens and added a correction
    context = context + draft.tokens[:3] + [7]
    fuzzy.propose(context, 4)
    exact.propose(context, 4)
    for a, b in zip(
        kv(fuzzy_model, 0, len(context)), kv(exact_model, 0, len(context)), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# chi-square over thousands of sampled runs: minutes on 2 cores (make test runs it; test-fast
# keeps the verifier's own statistical tests, test_verify.py)
@pytest.mark.slow
def test_fuzzy_sampling_matches_the_target_distribution(small, tmp_path):
    from test_decoding import ALPHA, SMALL_PROMPT, exact_joint, gof_pvalue, sample_outcomes
    from tiny import SMALL_V

    tgt, _ = small
    path = make_tiny_model_dir(tmp_path / "d", vocab_size=SMALL_V, num_layers=4, seed=4)
    drafter = ModelDrafter(load_model(str(path), max_len=32).model, fuzzy_groups=((1, 3),))
    params = SamplingParams(temperature=1.0)
    counts, totals = sample_outcomes(tgt.model, drafter, params, range(700_000, 702_000))
    assert 0 < totals["accepted"] < totals["draft"]
    pvalue = gof_pvalue(counts, exact_joint(tgt.model, SMALL_PROMPT, params))
    print(f"fuzzy drafting t=1: p={pvalue:.3g}")
    assert pvalue > ALPHA


@pytest.mark.parametrize("group", [2, 3])
def test_two_rank_group_drafts_as_the_single_process_reference(tiny_dir, deep_drafter, group):
    """A 2-rank gloo drafter group (attentions of a group on different ranks) proposes what
    one process running the same fuzzy groups proposes, greedy and sampled."""
    from distspec.spec_decode.drafters.factory import load_drafter, new_drafter
    from distspec.workers.drafter import DrafterSpec, DrafterWorker, WorkerDrafter
    from distspec.workers.local_group import LocalGroup

    groups = easyspec_groups(6, group)
    loaded = load_drafter(deep_drafter, str(tiny_dir), max_len=64)
    reference = new_drafter(loaded, lookup=False, fuzzy_groups=groups)
    spec = DrafterSpec(
        deep_drafter, str(tiny_dir), num_slots=1, max_len=64, lookup=False,
        parallel="layer", easyspec_group=group,
    )  # fmt: skip
    prompt = list(range(60, 72))
    with LocalGroup(DrafterWorker, spec, world_size=2) as local:
        assert local.leader.fuzzy_groups == groups
        ranked = WorkerDrafter(local.leader)
        for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=5)):
            ranked.start(prompt, params)
            contexts, drafts = [list(prompt)], []
            for accept in (2, 0, 4):  # then a correction token: the calibration path
                drafts.append(ranked.propose(contexts[-1], 5))
                contexts.append(contexts[-1] + drafts[-1].tokens[:accept] + [9])
            reference.start(prompt, params)
            same = [reference.propose(c, 5) for c in contexts[:-1]]
            assert [d.tokens for d in drafts] == [d.tokens for d in same]
        ranked.finish()


@pytest.mark.parametrize("mode", ["sd", "pearl"])
def test_generate_with_a_layer_parallel_drafter(capsys, tiny_dir, deep_drafter, mode):
    """`distspec generate --drafter-parallel layer --easyspec-group 2`: the drafter's groups
    run over 2 processes; greedy output is the target's own."""
    from distspec.cli import main

    args = ["generate", "--target", str(tiny_dir), "--drafter", deep_drafter, "--mode", mode]
    args += ["--prompt", "abcabcab", "--raw", "--json", "--max-new-tokens", "24"]
    args += ["--drafter-parallel", "layer", "--easyspec-group", "2", "--no-lookup"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    loaded = load_model(str(tiny_dir), max_len=4096)
    plain = SpeculativeDecoder(loaded.model, None, eos_token_ids=loaded.tokenizer.eos_token_ids)
    expected, _ = plain.generate(loaded.tokenizer.encode("abcabcab"), SamplingParams(24))
    assert result["token_ids"] == expected
    assert result["stats"]["draft_tokens"] > 0


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--drafter-parallel", "layer"], "needs --easyspec-group"),
        (["--easyspec-group", "1"], "group size must be 0 (off) or >= 2"),
        (["--easyspec-group", "2", "--easyspec-exact", "1"], "expected FIRST,LAST"),
        (["--easyspec-group", "2", "--drafter", "ngram"], "EasySpec needs a model drafter"),
        (["--drafter-parallel", "layer", "--easyspec-group", "2", "--drafter-ranks", "0"],
         "drafter_ranks must be >= 1"),
    ],
)  # fmt: skip
def test_easyspec_flag_errors_are_one_line(capsys, tiny_dir, deep_drafter, extra, fragment):
    from distspec.cli import main

    args = ["generate", "--target", str(tiny_dir), "--prompt", "abc", "--raw"]
    if "--drafter" not in extra:
        args += ["--drafter", deep_drafter]
    try:
        rc = main(args + extra)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "Traceback" not in err
    assert fragment in err, err
