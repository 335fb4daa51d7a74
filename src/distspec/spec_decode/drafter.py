"""The one interface every drafting method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from distspec.spec_decode.sampling import SamplingParams


@dataclass
class Draft:
    """Proposed tokens and the distribution each was drawn from.

    probs is [len(tokens), V] for sampled drafts; None means deterministic (a point mass on
    each token: greedy model drafts, n-gram lookups)."""

    tokens: list[int]
    probs: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: slice) -> Draft:
        probs = None if self.probs is None else self.probs[index]
        return Draft(self.tokens[index], probs)

    def __add__(self, other: Draft) -> Draft:
        """The tokens of both, in order; a point mass stands in for missing probs."""
        if self.probs is None and other.probs is None:
            return Draft(self.tokens + other.tokens)
        if not self.tokens:
            return other
        if not other.tokens:
            return self
        vocab = (self.probs if self.probs is not None else other.probs).shape[-1]
        probs = torch.cat([self._dense(vocab), other._dense(vocab)])
        return Draft(self.tokens + other.tokens, probs)

    def _dense(self, vocab: int) -> torch.Tensor:
        if self.probs is not None:
            return self.probs
        probs = torch.zeros(len(self.tokens), vocab)
        probs[torch.arange(len(self.tokens)), torch.tensor(self.tokens)] = 1.0
        return probs


EMPTY_DRAFT = Draft([])


class Drafter(ABC):
    name: str = "drafter"
    # per-token acceptance the draft-length policy assumes before a request's first verdicts
    prior_acceptance: float = 0.6

    @abstractmethod
    def start(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Begin a request (reset per-request state)."""

    @abstractmethod
    def propose(self, context: list[int], k: int) -> Draft:
        """Up to k tokens to follow context, the verified sequence so far (prompt + output).

        Within a request, what was proposed may be rejected and PEARL drafts after unverified
        tokens that it may drop later, so the context is not always an extension of the
        previous one: drafters keep their own state keyed on it."""

    def finish(self) -> None:
        """End the request (free per-request resources)."""
        return None
