"""The one interface every drafting method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from distspec.spec.sampling import SamplingParams


@dataclass
class Draft:
    """Proposed tokens and the distribution each was drawn from.

    probs is [len(tokens), V] for sampled drafts; None means deterministic (a point mass on
    each token: greedy model drafts, n-gram lookups)."""

    tokens: list[int]
    probs: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.tokens)


EMPTY_DRAFT = Draft([])


class Drafter(ABC):
    name: str = "drafter"

    @abstractmethod
    def start(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Begin a request (reset per-request state)."""

    @abstractmethod
    def propose(self, context: list[int], k: int) -> Draft:
        """Up to k tokens to follow context, the verified sequence so far (prompt + output).

        Within a request, context only grows; everything after the previous context may differ
        from what was proposed (rejections), so drafters keep their own state keyed on it."""

    def finish(self) -> None:
        """End the request (free per-request resources)."""
        return None
