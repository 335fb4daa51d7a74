"""Self-speculation: drafters built from the target's own weights (models/self_draft.py)."""

from __future__ import annotations

import pytest
import torch

from distspec.models.linear import QuantLinear
from distspec.models.loader import load_model
from distspec.models.quantized import Q4Weight, Q8Weight
from distspec.models.self_draft import load_self_drafter, self_form
from distspec.models.tokenizer import ChatMessage
from distspec.spec_decode.decoding import SpeculativeDecoder
from distspec.spec_decode.drafters.factory import build_drafter, load_drafter
from distspec.spec_decode.sampling import SamplingParams
from hf_reference import hf_greedy
from tiny import TINY_MAX_LEN


def linears(model):
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    return [attn.wqkv, attn.wo, mlp.w_gate_up, mlp.w_down]


def test_names():
    assert self_form("self") == "int4"
    assert [self_form(f"self-{f}") for f in ("int4", "int8", "bf16")] == ["int4", "int8", "bf16"]
    assert self_form("demo") is None and self_form("/models/selfish") is None
    with pytest.raises(ValueError, match="unknown self drafter 'self-fp8'.*self-int4"):
        self_form("self-fp8")


def test_forms_hold_what_they_say(target):
    int4 = load_self_drafter(target, "int4").model
    assert all(isinstance(m, QuantLinear) and m.kind == "int4" for m in linears(int4))
    assert all(m.int8_activations for m in linears(int4))
    assert int4.lm_head.kind == "int8"  # the head keeps 8 bits
    assert int4.embed is target.model.embed  # read from the target, not copied
    assert int4.layers[0].attn.kv_cache is not target.model.layers[0].attn.kv_cache
    int8 = load_self_drafter(target, "int8").model
    assert all(m.kind == "int8" for m in [*linears(int8), int8.lm_head])
    bf16 = load_self_drafter(target, "bf16").model
    assert bf16.dtype == torch.bfloat16 and not isinstance(bf16.lm_head, QuantLinear)


def test_a_self_drafter_in_its_own_process_loads_from_the_name(tiny_dir):
    loaded = load_drafter("self-int8", str(tiny_dir), max_len=TINY_MAX_LEN, num_slots=3)
    assert loaded.model.num_slots == 3 and loaded.model.lm_head.kind == "int8"


@pytest.mark.parametrize("name", ["self", "self-int8", "self-bf16"])
@pytest.mark.parametrize("target_kv", [False, True], ids=["own-kv", "target-kv"])
@pytest.mark.parametrize("lookup", [False, True], ids=["model", "lookup"])
def test_greedy_with_a_self_drafter_equals_plain_decoding(target, name, target_kv, lookup):
    slot = 0 if target_kv else None
    drafter = build_drafter(name, target, TINY_MAX_LEN, lookup, target_kv_slot=slot)
    assert (drafter.target_kv is not None) == target_kv
    params = SamplingParams(max_new_tokens=40)
    prompt = target.tokenizer.encode("Once upon a time")
    ar, _ = SpeculativeDecoder(target.model, None, eos_token_ids=[]).generate(prompt, params)
    dec = SpeculativeDecoder(target.model, drafter, gamma=8, eos_token_ids=[])
    sd, last = dec.generate(prompt, params)
    assert sd == ar
    assert last.stats.accepted_tokens > 0


@pytest.mark.slow
def test_the_demo_int4_copy_is_the_gguf_blocks_bit_for_bit(demo_loaded):
    """The demo GGUF stores Q4_1 layers and a Q8_0 embedding: the int4 copy takes them as
    they are (the head too), where self-int8 quantizes the layers again to Q8_0."""
    native = load_model("demo", max_len=64, weight_dtype="int4").model
    copy = load_self_drafter(demo_loaded, "int4", max_len=64).model
    pairs = zip([*linears(native), native.lm_head], [*linears(copy), copy.lm_head], strict=True)
    for a, b in pairs:
        assert a.format is b.format
        for pa, pb in zip(a.weight.parts(), b.weight.parts(), strict=True):
            assert torch.equal(pa, pb)
    assert copy.lm_head.format is Q8Weight and linears(copy)[0].format is Q4Weight
    int8 = load_self_drafter(demo_loaded, "int8", max_len=64).model
    assert all(m.format is Q8Weight for m in linears(int8))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["self", "self-int8", "self-bf16"])
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "raw"])
def test_greedy_with_a_self_drafter_equals_transformers(demo_loaded, demo_hf, name, chat):
    hf_model, hf_tok = demo_hf
    text = "Write a haiku about the sea." if chat else "The three primary colors are"
    tok = demo_loaded.tokenizer
    ids = tok.encode_chat([ChatMessage("user", text)]) if chat else tok.encode(text)
    expected = hf_greedy(hf_model, ids, 48)
    drafter = build_drafter(name, demo_loaded, max_len=2048, target_kv_slot=0)  # the engine's
    # bf16 steps cost about a target step on CPUs without bf16 kernels: the adaptive policy
    # rightly hardly drafts with it, so its drafts are checked at a fixed length
    adaptive = name != "self-bf16"
    dec = SpeculativeDecoder(demo_loaded.model, drafter, 12, tok.eos_token_ids, adaptive=adaptive)
    out, last = dec.generate(ids, SamplingParams(max_new_tokens=48))
    assert out == expected
    assert last.stats.acceptance_rate > 0.6  # the demo drafter: about 0.4


def test_the_weights_fingerprint_follows_content_not_location(tiny_dir, tiny_drafter_dir, tmp_path):
    import shutil

    from distspec.models.identity import weights_fingerprint

    moved = shutil.copytree(tiny_dir, tmp_path / "moved")
    assert weights_fingerprint(str(moved)) == weights_fingerprint(str(tiny_dir))
    assert weights_fingerprint(str(tiny_drafter_dir)) != weights_fingerprint(str(tiny_dir))


def test_a_copy_beside_its_target_reads_verified_kv_from_the_target(target):
    """Sequential speculation in the target's slot: no prefill at start, and the first draft
    copies the prompt's K/V from the target's cache (bitwise) instead of computing them."""
    drafter = build_drafter("self", target, TINY_MAX_LEN, lookup=False, target_kv_slot=0)
    forwards = []
    inner = drafter._forward
    drafter._forward = lambda step: forwards.append((step.start, len(step.tokens))) or inner(step)
    prompt = target.tokenizer.encode("Once upon a time there was")
    n = len(prompt)
    target.model(torch.tensor([prompt]), torch.arange(n)[None], torch.tensor([0]))
    drafter.start(prompt, SamplingParams())
    assert forwards == []
    context = [*prompt, 7]
    drafter.propose(context, 3)
    assert forwards[0] == (n, 1)  # only the newest token; the prompt's K/V were copied
    for own, theirs in zip(drafter.model.layers, target.model.layers, strict=True):
        assert torch.equal(own.attn.kv_cache.k[0, :, :n], theirs.attn.kv_cache.k[0, :, :n])
        assert torch.equal(own.attn.kv_cache.v[0, :, :n], theirs.attn.kv_cache.v[0, :, :n])


def test_only_a_copy_of_the_target_reads_its_kv(target, tiny_drafter_dir):
    from distspec.spec_decode.drafters.model import ModelDrafter

    other = build_drafter(str(tiny_drafter_dir), target, TINY_MAX_LEN, target_kv_slot=0)
    assert other.target_kv is None  # not a copy: its own K/V, whatever its shapes
    assert not other.check_lookup  # and its lookup tokens are drafted unchecked
    small = load_model(str(tiny_drafter_dir), max_len=TINY_MAX_LEN).model
    if len(small.layers) != len(target.model.layers):
        with pytest.raises(ValueError, match="not laid out as the target's"):
            ModelDrafter(small, target_kv=(target.model, 0))


def test_a_copy_starts_the_draft_length_policy_at_its_own_prior(target):
    from distspec.spec_decode.defaults import SELF_PRIOR_ACCEPTANCE
    from distspec.spec_decode.draft_policy import DraftLengthPolicy, measure_costs

    drafter = build_drafter("self", target, TINY_MAX_LEN)
    assert drafter.prior_acceptance == SELF_PRIOR_ACCEPTANCE > 0.6
    assert drafter.check_lookup  # it keeps looked-up tokens only where it agrees
    costs = measure_costs(target.model, drafter, 8, context_len=16, repeats=1)
    assert costs.prior_alpha == SELF_PRIOR_ACCEPTANCE
    assert DraftLengthPolicy(costs=costs).alpha == SELF_PRIOR_ACCEPTANCE
    assert DraftLengthPolicy().alpha == 0.6  # no costs: the general prior
