"""The one interface every drafting method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from distspec.spec_decode import tree
from distspec.spec_decode.sampling import SamplingParams


@dataclass
class Draft:
    """Proposed tokens. A sampling drafter draws them with the request's race noise
    (sampling.draw), so no distribution travels with them: the verifier compares tokens.

    parents: a token tree (spec_decode/tree.py): node i follows node parents[i], -1 the last
    verified token; None (and a tree that is one chain) is a chain."""

    tokens: list[int]
    parents: list[int] | None = None

    def __post_init__(self) -> None:
        if self.parents is not None:
            if len(self.parents) != len(self.tokens):
                raise ValueError("a tree draft needs one parent per token")
            tree.check_parents(self.parents)
            if tree.is_chain(self.parents):
                self.parents = None

    @property
    def is_tree(self) -> bool:
        return self.parents is not None

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: slice) -> Draft:
        if self.is_tree and index.start in (None, 0) and index.step in (None, 1):
            return Draft(self.tokens[index], self.parents[index])  # the first nodes: a tree
        return Draft(self.tokens[index], self._chain("sliced"))

    def __add__(self, other: Draft) -> Draft:
        other._chain("joined")
        return Draft(self.tokens + other.tokens, self._chain("joined"))

    def _chain(self, what: str) -> None:
        if self.is_tree:
            raise ValueError(f"a tree draft cannot be {what}")


EMPTY_DRAFT = Draft([])


class Drafter(ABC):
    name: str = "drafter"
    # per-token acceptance the draft-length policy assumes before a request's first verdicts
    prior_acceptance: float = 0.6
    # drafts cost next to nothing and the drafter judges each node's chance itself (suffix,
    # recycle): it gets the longest draft each round and stops where a node stops paying
    # (price_nodes), instead of a length from one running acceptance estimate
    sizes_itself: bool = False

    @abstractmethod
    def start(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Begin a request (reset per-request state)."""

    @abstractmethod
    def propose(self, context: list[int], k: int) -> Draft:
        """Up to k tokens to follow context, the verified sequence so far (prompt + output).
        A tree drafter (its tree_width > 1) may return a tree of depth <= k and at most
        k * tree_width nodes.

        Within a request, what was proposed may be rejected and PEARL drafts after unverified
        tokens that it may drop later, so the context is not always an extension of the
        previous one: drafters keep their own state keyed on it."""

    def observe(self, chunk: list[int], logits: torch.Tensor) -> None:
        """The target just read chunk; logits[i] is its prediction after chunk[i] (for the
        last len(logits) tokens of chunk). Drafters that learn from the target keep what they
        need (Token Recycling); the rest ignore it."""
        return None

    def read(self, context: list[int]) -> None:
        """See the verified context without drafting (a server's plain rounds), so that a
        later draft starts from it and what the request wrote is remembered (suffix)."""
        return None

    def price_nodes(self, prices: tuple[float, ...]) -> None:
        """A drafter that judges its nodes' chances (trees; sizes_itself) adds a draft's
        (i+1)-th node only where that chance is at least prices[i] (the last price past the
        end; none: no limit). Set each round from measured costs (DraftLengthPolicy.node_prices)."""
        return None

    def forget(self) -> None:
        """Drop what earlier requests taught it (suffix's stored outputs, recycle's table):
        benchmarks start each repetition of a workload afresh."""
        return None

    def finish(self) -> None:
        """End the request (free per-request resources)."""
        return None

    def stop_reading_target_kv(self) -> None:
        """The target's cache will not hold the drafter's verified context when it drafts
        (PEARL drafts past what the target has read): a drafter that reads K/V from there
        stops doing so."""
        return None
