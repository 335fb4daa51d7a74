"""--mode auto: sd or pearl from a draft burst and a verify timed alone and at once."""

from __future__ import annotations

import pytest

from distspec import engine as engine_module
from distspec.engine import Engine, EngineConfig
from distspec.spec_decode.decoding import SpeculativeDecoder
from distspec.spec_decode.drafters import ModelDrafter
from distspec.spec_decode.mode_choice import (
    PEARL_MIN_SAVING,
    OverlapTiming,
    choose_mode,
    measure_overlap,
)
from distspec.spec_decode.pearl import PearlDecoder
from distspec.spec_decode.sampling import SamplingParams
from test_decoding import greedy_ar


@pytest.mark.parametrize(
    "timing, mode",
    [
        (OverlapTiming(0.03, 0.04, 0.04), "pearl"),  # separate cores: together = the longer
        (OverlapTiming(0.03, 0.04, 0.07), "sd"),  # shared cores: together = both in turn
        (OverlapTiming(0.03, 0.04, 0.09), "sd"),  # contention makes it worse
        (OverlapTiming(0.05, 0.05, 0.1 * (1 - PEARL_MIN_SAVING) + 1e-6), "sd"),  # not enough
        (OverlapTiming(0.05, 0.05, 0.1 * (1 - PEARL_MIN_SAVING) - 1e-6), "pearl"),
        (None, "sd"),  # nothing measured (a context too short to try)
    ],
)
def test_choose_mode_on_injected_timings(timing, mode):
    assert choose_mode(timing) == mode


def test_overlap_is_measured_without_disturbing_the_models(target, draft_model):
    drafter = ModelDrafter(draft_model.model)
    timing = measure_overlap(target.model, drafter, k=4)
    assert timing is not None and min(timing.draft_s, timing.verify_s, timing.together_s) > 0
    assert "saves" in str(timing)
    assert measure_overlap(target.model, drafter, k=target.model.max_len) is None
    ids = target.tokenizer.encode("Hello there")
    dec = SpeculativeDecoder(target.model, drafter, gamma=4, eos_token_ids=[])
    assert dec.generate(ids, SamplingParams(max_new_tokens=20))[0] == greedy_ar(target, ids, 20)


@pytest.mark.parametrize("choice", ["sd", "pearl"])
def test_auto_engine_runs_what_was_chosen(monkeypatch, tiny_dir, target, choice):
    """The engine builds the chosen decoder; a copy of the target reads the target's K/V
    under sd only; output is the target's either way."""
    monkeypatch.setattr(engine_module, "choose_mode", lambda timing: choice)
    engine = Engine(EngineConfig(target=str(tiny_dir), mode="auto", drafter="self", gamma=3))
    try:
        assert engine.mode == choice
        assert isinstance(engine.decoder, PearlDecoder) == (choice == "pearl")
        assert (engine.drafter.target_kv is not None) == (choice == "sd")
        ids = target.tokenizer.encode("abcabc")
        steps = engine.stream(ids, SamplingParams(max_new_tokens=24))
        out = [t for step in steps for t in step.token_ids]
        assert out == greedy_ar(target, ids, 24)
    finally:
        engine.close()
