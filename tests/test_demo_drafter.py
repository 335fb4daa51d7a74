"""The shipped demo drafter: size, exactness with it, and the acceptance recorded in training."""

from __future__ import annotations

import json

import pytest

from distspec.models.tokenizer import ChatMessage
from distspec.spec_decode.decoding import SpeculativeDecoder
from distspec.spec_decode.drafters import ModelDrafter
from distspec.spec_decode.drafters.factory import build_drafter, demo_drafter_dir
from distspec.spec_decode.sampling import SamplingParams
from hf_reference import hf_greedy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def drafter(demo_loaded) -> ModelDrafter:
    return build_drafter("demo", demo_loaded, max_len=2048)


def test_shipped_files_are_small_and_complete():
    d = demo_drafter_dir()
    assert (d / "model.safetensors").stat().st_size <= 30 * 2**20
    record = json.loads((d / "training_record.json").read_text())
    assert record["tokens_per_target_forward"] > 1.0 and record["heldout"]


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "raw"])
def test_greedy_with_demo_drafter_equals_transformers(demo_loaded, demo_hf, drafter, chat):
    hf_model, hf_tok = demo_hf
    text = "Write a haiku about the sea." if chat else "The three primary colors are"
    if chat:
        ids = hf_tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True
        )
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        ids = list(ids)
        assert ids == demo_loaded.tokenizer.encode_chat([ChatMessage("user", text)])
    else:
        ids = hf_tok(text)["input_ids"]
    expected = hf_greedy(hf_model, ids, 48)
    dec = SpeculativeDecoder(demo_loaded.model, drafter, 4, demo_loaded.tokenizer.eos_token_ids)
    out, last = dec.generate(ids, SamplingParams(max_new_tokens=48))
    assert out == expected
    assert last.stats.accepted_tokens > 0


def test_recorded_acceptance_reproduces(demo_loaded):
    record = json.loads((demo_drafter_dir() / "training_record.json").read_text())
    drafter = build_drafter("demo", demo_loaded, max_len=2048, lookup=record["lookup"])
    dec = SpeculativeDecoder(
        demo_loaded.model, drafter, record["gamma"], demo_loaded.tokenizer.eos_token_ids
    )
    params = SamplingParams(max_new_tokens=record["max_new_tokens"])
    for row in record["heldout"][:3]:
        ids = demo_loaded.tokenizer.encode_chat([ChatMessage("user", row["prompt"])])
        out, last = dec.generate(ids, params)
        tau = last.stats.tokens_per_target_forward
        assert tau == pytest.approx(row["new_tokens"] / row["target_forwards"], rel=0.05)
