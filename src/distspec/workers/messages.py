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
    steps: plain decoding (an empty draft) of up to this many tokens in the one call, a
        forward each, ending after a token in `stops`; the call answers with a Decoded.
    reuse: a prompt (from position 0, an empty draft) may skip what its slot holds of it
        (models/prefix_cache.py); False where the slot's last session was another tenant's.
    """

    session: int
    slot: int
    start: int
    tokens: list[int]
    draft: Draft | None = None
    defer: bool = False
    steps: int = 1
    stops: frozenset[int] = frozenset()
    reuse: bool = True

    def __post_init__(self) -> None:
        if (self.draft is None) == (not self.defer):
            raise ValueError("a ForwardItem either carries a draft to verify or is deferred")
        if self.steps < 1 or (self.steps > 1 and (self.draft is None or len(self.draft))):
            raise ValueError("only plain decoding (an empty draft) runs more than one step")


@dataclass
class Decoded:
    """A multi-step item's answer (ForwardItem.steps): the tokens its steps decoded, in order,
    each the verifier's verdict on an empty draft. Read as a Verdict (num_accepted,
    tokens): nothing accepted."""

    new_tokens: list[int]
    num_accepted: int = 0

    def tokens(self, draft: Draft) -> list[int]:
        return list(self.new_tokens)


@dataclass
class Prefilled:
    """A prompt's answer (a ForwardItem from position 0 with an empty draft): its first token,
    and how many of its tokens the KV slot held already, not run (models/prefix_cache.py)."""

    next_token: int
    cached: int = 0


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
