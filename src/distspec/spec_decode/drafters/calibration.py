"""How often a drafter's nodes were accepted, learnt from its own verdicts: the chance a
model-free drafter gives its next nodes, per bucket of its own making (suffix: the match
length; recycle: the stored probability).

A drafter records, with each draft, the bucket of every node. The next context shows what
the target kept: the nodes on the accepted path were accepted; a node was tried when its
parent was accepted (the root's children always are), and rejected if it was tried and is not
on the path. Nodes under a rejected one tell nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distspec.spec_decode import tree
from distspec.spec_decode.drafter import Draft


@dataclass
class NodeCalibration:
    buckets: int
    prior: float = 0.6  # the chance assumed before any verdict, weighing `weight` nodes
    weight: float = 2.0
    decay: float = 1.0  # each scored draft scales the earlier counts by this (1: never age)
    hits: list[float] = field(default_factory=list)
    tries: list[float] = field(default_factory=list)
    _last: tuple[int, Draft, list[int]] | None = None  # (context length, draft, buckets)

    def __post_init__(self) -> None:
        self.hits = self.hits or [0.0] * self.buckets
        self.tries = self.tries or [0.0] * self.buckets

    def rate(self, bucket: int) -> float:
        return (self.hits[bucket] + self.prior * self.weight) / (self.tries[bucket] + self.weight)

    def drafted(self, context_len: int, draft: Draft, buckets: list[int]) -> None:
        """A draft proposed after context_len tokens, buckets[i] node i's."""
        self._last = (context_len, draft, buckets) if len(draft) else None

    def verified(self, context: list[int]) -> None:
        """The context the drafter is asked to continue next: score the last draft on it."""
        if self._last is None:
            return
        start, draft, buckets = self._last
        self._last = None
        if len(context) <= start:
            return
        path = set(tree.accepted_path(draft, context[start:]))
        if self.decay < 1:
            self.hits = [h * self.decay for h in self.hits]
            self.tries = [t * self.decay for t in self.tries]
        parents = draft.parents or list(range(-1, len(draft) - 1))
        for node, parent in enumerate(parents):
            if parent == -1 or parent in path:
                self.tries[buckets[node]] += 1
                self.hits[buckets[node]] += node in path

    def forget(self) -> None:
        self.hits, self.tries, self._last = [0.0] * self.buckets, [0.0] * self.buckets, None
