"""Greedy references: what a server must answer to greedy requests, from the local engine.

The target is loaded in this process (load_model, packed for the CPU as the workers pack
it) and each prompt decoded plainly (no drafter) with the server's stop rules: the model's
EOS ends an answer (and is part of it), max_new_tokens and the context length cut it.
"""

from __future__ import annotations

import gc

import torch

from distspec.models.loader import load_for_inference
from distspec.spec_decode.decoding import SpeculativeDecoder
from distspec.spec_decode.sampling import SamplingParams


def greedy_references(
    model: str,
    prompts: list[list[int]],
    max_new_tokens: int | list[int],
    max_len: int,
    device: str = "cpu",
    dtype: str = "float32",
    progress=None,
) -> list[list[int]]:
    """The greedy answer (new token ids) to each prompt (token ids); max_new_tokens: one for
    all, or one per prompt. progress: called once per prompt done (a tqdm's update, say)."""
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    if len(limits) != len(prompts):
        raise ValueError("max_new_tokens: one per prompt")
    loaded = load_for_inference(model, device, getattr(torch, dtype), max_len)
    decoder = SpeculativeDecoder(loaded.model, None, eos_token_ids=loaded.tokenizer.eos_token_ids)
    answers = []
    try:
        with torch.inference_mode():
            for ids, n in zip(prompts, limits, strict=True):
                out, _ = decoder.generate(ids, SamplingParams(max_new_tokens=n))
                answers.append(out)
                if progress is not None:
                    progress()
    finally:
        del decoder, loaded
        gc.collect()  # the weights go before the servers load theirs
    return answers


def first_difference(got: list[int], want: list[int]) -> int | None:
    """The index of the first token where got differs from want (a missing or an extra token
    included); None when they are equal."""
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return i
    return None if len(got) == len(want) else min(len(got), len(want))
