"""What transformers itself generates: the reference the demo-model tests compare with."""

from __future__ import annotations

import torch


def hf_greedy(hf_model, ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of ids (new tokens only)."""
    with torch.inference_mode():
        out = hf_model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )
    return out[0, len(ids) :].tolist()
