"""A small Llama-family model that shares the target's tokenizer, drafting autoregressively.

Optionally with prompt lookup: when the verified text ends with an n-gram seen before, the
draft starts with what followed it (a point mass q under sampling) and the model drafts on
from there. Small drafters copy poorly and copying is where a lookup is most often right
(on the demo pair's benchmark outputs, positions with a >=2-token match: lookup right 71%,
drafter 40%), so the two complement each other; lookup tokens also cost no model step.
"""

from __future__ import annotations

import torch

from distspec.models.llama import Transformer
from distspec.spec_decode.drafter import Draft, Drafter
from distspec.spec_decode.drafters.ngram import NgramDrafter
from distspec.spec_decode.sampling import SamplingParams, probs_from_logits, sample


class ModelDrafter(Drafter):
    name = "model"

    def __init__(
        self,
        model: Transformer,
        slot: int = 0,
        min_confidence: float = 0.0,
        lookup: NgramDrafter | None = None,
        fuzzy_groups: tuple[tuple[int, int], ...] = (),
    ):
        """min_confidence: stop drafting after a token whose probability under the drafter is
        below this (an early stop on low confidence, as in SpecDec++ / SVIP).
        lookup: prompt lookup to follow first (see the module docstring).
        fuzzy_groups: EasySpec layer groups (models.llama.easyspec_groups) for the draft
        steps. The first forward of each draft, over the tokens verified since the last one,
        is exact and overwrites their fuzzy K/V: EasySpec's calibration, at no extra
        forward."""
        self.model = model
        self.min_confidence = min_confidence
        self.lookup = lookup
        self.fuzzy_groups = tuple(fuzzy_groups)
        self.slot = torch.tensor([slot])
        self.cached: list[int] = []  # tokens whose K/V are in the drafter's cache, in order
        self.exact_upto = 0  # cached[:exact_upto] have exact K/V (the rest: fuzzy steps)
        self.params = SamplingParams()
        self.generator: torch.Generator | None = None

    def start(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Also reads the prompt (all but its last token) into the drafter's cache now, so
        that the first draft costs what the others do: a round that also prefilled the
        drafter looks like a slow speculative round to whoever times rounds (the policy, the
        scheduler's speculation switch)."""
        self.cached = []
        self.exact_upto = 0
        head = prompt_ids[:-1][: self.model.max_len - 1]
        if head:
            self._forward(head, 0)
            self.cached, self.exact_upto = list(head), len(head)
        self.params = params
        self.generator = None if params.greedy else params.generator(stream=1)
        if self.lookup is not None:
            self.lookup.start(prompt_ids, params)

    def propose(self, context: list[int], k: int) -> Draft:
        k = min(k, self.model.max_len - len(context))
        if k <= 0:
            return Draft([])
        keep = _common_prefix(self.cached, context, limit=min(len(context) - 1, self.exact_upto))
        self.cached = context[:keep]
        tokens = self.lookup.propose(context, k).tokens if self.lookup is not None else []
        probs = [self._point_mass(t) for t in tokens] if self.generator is not None else []
        pending = context[keep:] + tokens  # fed to the model before its next prediction
        exact = True  # the first forward: verified tokens (and lookup ones), exactly
        while len(tokens) < k:
            logits = self._forward(pending, len(self.cached), () if exact else self.fuzzy_groups)
            self.cached += pending
            if exact or not self.fuzzy_groups:
                self.exact_upto = len(self.cached)
            exact = False
            tok, confidence = self._pick(logits, probs)
            tokens.append(tok)
            if confidence < self.min_confidence:
                break
            pending = [tok]
        return Draft(tokens, torch.stack(probs) if probs else None)

    def _forward(self, tokens: list[int], start: int, fuzzy_groups=()) -> torch.Tensor:
        t = torch.tensor([tokens])
        pos = torch.arange(start, start + len(tokens))[None]
        return self.model(t, pos, self.slot, last_only=True, fuzzy_groups=fuzzy_groups)[0, -1]

    def _point_mass(self, tok: int) -> torch.Tensor:
        q = torch.zeros(self.model.config.vocab_size, device=self.model.device)
        q[tok] = 1.0
        return q

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
