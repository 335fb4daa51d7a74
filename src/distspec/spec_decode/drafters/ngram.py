"""Prompt lookup: match the last n tokens earlier in prompt + output, propose what followed."""

from __future__ import annotations

from distspec.spec_decode.drafter import Draft, Drafter
from distspec.spec_decode.sampling import SamplingParams


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.sizes = range(max_ngram, min_ngram - 1, -1)
        self._reset()

    def _reset(self) -> None:
        # n -> {ngram: latest start index that has at least one token after it}
        self._index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self._indexed: list[int] = []  # the context indexed so far

    def start(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self._reset()

    def propose(self, context: list[int], k: int) -> Draft:
        if k <= 0:
            return Draft([])
        self._extend_index(context)
        for n in self.sizes:
            if len(context) <= n:
                continue
            j = self._index[n].get(tuple(context[-n:]))
            if j is not None:
                return Draft(context[j + n : j + n + k])
        return Draft([])

    def _extend_index(self, context: list[int]) -> None:
        done = len(self._indexed)
        if context[:done] != self._indexed:
            # The context is not an extension of the last one (PEARL dropped unverified
            # tokens): index it afresh.
            self._reset()
            done = 0
        # An n-gram starting at i is indexed once a token follows it: i + n < len(context).
        for n, table in self._index.items():
            for i in range(max(0, done - n), len(context) - n):
                table[tuple(context[i : i + n])] = i
        self._indexed = list(context)
