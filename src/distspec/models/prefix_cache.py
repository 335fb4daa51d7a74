"""Prompt prefix reuse: what each KV slot holds, so that a prompt that starts as the slot's
last sequence did runs only the rest (llama.cpp's cached prompt per slot; vLLM and SGLang
share prefixes across requests the same way, by blocks).

A slot's record is the tokens whose K/V the slot holds at positions 0, 1, ..., each the K/V of
that sequence. The model cuts the record at every write (Transformer.forward and move_kv: a
write at position p ends it at p), so no code that writes a slot can leave a stale record;
only code that knows what it wrote was that sequence, causally, extends it (`hold`): a
prefill, a decoder's verified tokens.

Reused K/V were computed in another forward (other rows beside them, another length), so they
may differ from a fresh prefill's in the last bits, as batching makes a row's differ.
"""

from __future__ import annotations


class SlotPrefixes:
    def __init__(self, num_slots: int, enabled: bool = True):
        self.enabled = enabled
        self._held: list[list[int]] = [[] for _ in range(num_slots)]

    def reusable(self, slot: int, tokens: list[int], limit: int | None = None) -> int:
        """How many of tokens' first positions the slot holds already: at most limit, by
        default len(tokens) - 1 (the last token is run for its logits)."""
        if not self.enabled:
            return 0
        limit = len(tokens) - 1 if limit is None else limit
        return common_prefix(self._held[slot], tokens, max(0, limit))

    def held(self, slot: int) -> list[int]:
        return list(self._held[slot])

    def hold(self, slot: int, tokens: list[int]) -> None:
        """The slot now holds tokens' K/V at positions 0.. (its caller wrote them)."""
        self._held[slot] = list(tokens) if self.enabled else []

    def written(self, slot: int, start: int) -> None:
        """K/V were written to the slot from position start on."""
        held = self._held[slot]
        if len(held) > start:
            del held[start:]

    def forget(self) -> None:
        for held in self._held:
            held.clear()


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """The length of the longest common prefix of a and b, at most limit."""
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
