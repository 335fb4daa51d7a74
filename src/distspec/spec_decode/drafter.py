"""The one interface every drafting method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from distspec.spec_decode.sampling import SamplingParams


@dataclass
class Draft:
    """Proposed tokens. A sampling drafter draws them with the request's race noise
    (sampling.draw), so no distribution travels with them: the verifier compares tokens."""

    tokens: list[int]

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: slice) -> Draft:
        return Draft(self.tokens[index])

    def __add__(self, other: Draft) -> Draft:
        return Draft(self.tokens + other.tokens)


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

    def stop_reading_target_kv(self) -> None:
        """The target's cache will not hold the drafter's verified context when it drafts
        (PEARL drafts past what the target has read): a drafter that reads K/V from there
        stops doing so."""
        return None
