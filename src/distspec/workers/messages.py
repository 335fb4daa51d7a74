"""What the scheduler sends target and drafter workers each step (schema only)."""

from __future__ import annotations

from dataclasses import dataclass

from distspec.spec_decode.drafter import Draft


@dataclass
class ForwardItem:
    """One session's chunk in a batched target step.

    tokens: the chunk, written to the session's KV slot from position `start`.
    draft: verify now (prefill, plain decoding, vanilla speculation): the chunk's last
        len(draft) tokens are the draft, and the verdict adds a correction or bonus token.
    defer: keep the rows for `decide` instead (PEARL: the drafter's first token is not known
        when the step starts).
    """

    session: int
    slot: int
    start: int
    tokens: list[int]
    draft: Draft | None = None
    defer: bool = False

    def __post_init__(self) -> None:
        if (self.draft is None) == (not self.defer):
            raise ValueError("a ForwardItem either carries a draft to verify or is deferred")


@dataclass
class DraftRequest:
    """Draft up to k tokens after context (prompt + output so far, maybe unverified tokens)."""

    session: int
    context: list[int]
    k: int
    prices: tuple[float, ...] = ()  # what a drafter's nodes must be worth (Drafter.price_nodes)


@dataclass(frozen=True)
class ModelInfo:
    vocab_size: int
    max_len: int
    num_slots: int
    eos_token_ids: tuple[int, ...]
