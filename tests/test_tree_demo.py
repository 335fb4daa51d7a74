"""The demo target with the model-free drafters and with token trees: greedy output equals
transformers' token for token."""

from __future__ import annotations

import pytest

from distspec.models.tokenizer import ChatMessage
from distspec.spec_decode.decoding import SpeculativeDecoder
from distspec.spec_decode.drafters.factory import build_drafter
from distspec.spec_decode.sampling import SamplingParams
from hf_reference import hf_greedy

pytestmark = pytest.mark.slow

PROMPT = (
    "Here is a list: apples, pears, plums, apples, pears, plums. Repeat the list twice, "
    "then name one more fruit."
)
CASES = [("suffix", 1), ("suffix", 3), ("recycle", 1), ("recycle", 3), ("demo", 3), ("self", 2)]


@pytest.mark.parametrize("name, width", CASES, ids=[f"{n}-w{w}" for n, w in CASES])
def test_greedy_with_new_drafters_and_trees_equals_transformers(demo_loaded, demo_hf, name, width):
    hf_model, _ = demo_hf
    ids = demo_loaded.tokenizer.encode_chat([ChatMessage("user", PROMPT)])
    expected = hf_greedy(hf_model, ids, 48)
    drafter = build_drafter(name, demo_loaded, max_len=2048, tree_width=width)
    dec = SpeculativeDecoder(demo_loaded.model, drafter, 4, demo_loaded.tokenizer.eos_token_ids)
    for _ in range(2):  # the second time, suffix and recycle draft from what the first left
        out, last = dec.generate(ids, SamplingParams(max_new_tokens=48))
        assert out == expected
    assert last.stats.accepted_tokens > 0
