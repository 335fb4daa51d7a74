"""`distspec bench`'s summary: end-to-end tokens/s and decoding alone (after the first token),
from per-prompt records."""

from __future__ import annotations

import pytest

from distspec.bench.runner import format_table, summarize


def record(name, repeat, prompt, tokens, wall_s, ttft_s, forwards=None):
    return {
        "contender": name,
        "repeat": repeat,
        "prompt": prompt,
        "token_ids": list(range(tokens)),
        "num_tokens": None,
        "wall_s": wall_s,
        "ttft_s": ttft_s,
        "target_forwards": forwards,
        "draft_tokens": 0 if forwards else None,
        "accepted_tokens": 0 if forwards else None,
        "draft_s": 0.0,
        "verify_s": wall_s,
        "text": "x",
    }


def test_decode_rate_leaves_out_the_prompts_prefill():
    # the same 1 s prefill for both; b decodes its 100 tokens twice as fast
    records = [
        record("a", 0, 0, 101, 3.0, 1.0, forwards=101),
        record("b", 0, 0, 101, 2.0, 1.0, forwards=51),
        record("hf", 0, 0, 101, 2.5, None),
    ]
    summary = summarize(records, ["a", "b", "hf"], greedy=True)
    assert summary["b"]["speedup_vs_a"] == pytest.approx(1.5)
    assert summary["a"]["decode_tokens_per_s"] == pytest.approx(50.0)
    assert summary["b"]["decode_tokens_per_s"] == pytest.approx(100.0)
    assert "decode_tokens_per_s" not in summary["hf"]  # transformers reports no first token
    table = format_table(summary)
    assert "| b | 50.5 | 1.50x | 100.0 (2.00x) |" in table
    assert "| hf | 40.4 | 1.20x | - |" in table
