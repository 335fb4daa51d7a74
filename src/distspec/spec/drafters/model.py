"""A small Llama-family model that shares the target's tokenizer, drafting autoregressively."""

from __future__ import annotations

import torch

from distspec.models.llama import Transformer
from distspec.spec.drafter import Draft, Drafter
from distspec.spec.sampling import SamplingParams, probs_from_logits, sample


class ModelDrafter(Drafter):
    name = "model"

    def __init__(self, model: Transformer, slot: int = 0, min_confidence: float = 0.0):
        """min_confidence: stop drafting after a token whose probability under the drafter is
        below this (an early stop on low confidence, as in SpecDec++ / SVIP)."""
        self.model = model
        self.min_confidence = min_confidence
        self.slot = torch.tensor([slot])
        self.cached: list[int] = []  # tokens whose K/V are in the drafter's cache, in order
        self.params = SamplingParams()
        self.generator: torch.Generator | None = None

    def start(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.cached = []
        self.params = params
        self.generator = None if params.greedy else params.generator(stream=1)

    def propose(self, context: list[int], k: int) -> Draft:
        k = min(k, self.model.max_len - len(context))
        if k <= 0:
            return Draft([])
        keep = _common_prefix(self.cached, context, limit=len(context) - 1)
        logits = self._forward(context[keep:], keep)
        self.cached = list(context)
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        for i in range(k):
            tok, confidence = self._pick(logits, probs)
            tokens.append(tok)
            if confidence < self.min_confidence:
                break
            if i < k - 1:
                logits = self._forward([tok], len(self.cached))
                self.cached.append(tok)
        return Draft(tokens, torch.stack(probs) if probs else None)

    def _forward(self, tokens: list[int], start: int) -> torch.Tensor:
        t = torch.tensor([tokens])
        pos = torch.arange(start, start + len(tokens))[None]
        return self.model(t, pos, self.slot, last_only=True)[0, -1]

    def _pick(self, logits: torch.Tensor, probs: list[torch.Tensor]) -> tuple[int, float]:
        """(token, its probability under the drafter)."""
        if self.generator is None:
            tok = int(logits.argmax())
            conf = 1.0 if self.min_confidence <= 0 else float(torch.softmax(logits, -1)[tok])
            return tok, conf
        q = probs_from_logits(logits, self.params)
        probs.append(q)
        tok = sample(q, self.generator)
        return tok, float(q[tok])


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
