"""Draft-then-verify decoding of one request on a local target model.

Plain autoregressive decoding is the same loop with no drafter (every draft is empty), so
both modes share one code path and one verifier.

Invariant: the target's KV cache holds every token of the sequence but the newest, which is
fed first in the next verification chunk; a rejection therefore needs no cache operation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from distspec.models.llama import Transformer
from distspec.spec_decode import tree
from distspec.spec_decode.draft_policy import DraftCosts, DraftLengthPolicy
from distspec.spec_decode.drafter import EMPTY_DRAFT, Drafter
from distspec.spec_decode.sampling import SamplingParams
from distspec.spec_decode.verify import verify


@dataclass
class GenerationStats:
    new_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt's, reused from the KV slot (models/prefix_cache.py)
    wall_s: float = 0.0
    time_to_first_token_s: float = 0.0
    target_forwards: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    draft_s: float = 0.0
    verify_s: float = 0.0

    def count_verdict(self, num_draft: int, num_accepted: int) -> None:
        if num_draft:
            self.draft_tokens += num_draft
            self.accepted_tokens += num_accepted
            per_pos = self.accepted_per_position
            per_pos.extend([0] * (num_draft - len(per_pos)))
            for i in range(num_accepted):
                per_pos[i] += 1

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            tokens_per_s=self.tokens_per_s,
            tokens_per_target_forward=self.tokens_per_target_forward,
            acceptance_rate=self.acceptance_rate,
        )
        return d


@dataclass
class StepOutput:
    token_ids: list[int]  # new tokens of this step
    finish_reason: str | None = None  # "stop" (EOS/stop token) | "length" once finished
    stats: GenerationStats | None = None  # set on the last step
    num_accepted: int = 0  # draft tokens accepted in this step
    chunk_done: bool = False  # this step settled an externally offered chunk (Speculate)
    position: int = 0  # index of token_ids[0] in prompt + output (set by the scheduler)


class SpeculativeDecoder:
    def __init__(
        self,
        target: Transformer,
        drafter: Drafter | None = None,
        gamma: int = 4,
        eos_token_ids: list[int] | None = None,
        slot: int = 0,
        adaptive: bool = False,
        costs: DraftCosts | None = None,
    ):
        """gamma: draft tokens per round (the most, with adaptive=True: see DraftLengthPolicy)."""
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        self.target, self.drafter, self.gamma = target, drafter, gamma
        self.adaptive, self.costs = adaptive, costs
        self.eos_token_ids = list(eos_token_ids or [])
        self.slot = torch.tensor([slot])

    def generate(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> tuple[list[int], StepOutput]:
        """Run to completion: (new token ids, last step with finish reason and stats)."""
        out: list[int] = []
        for step in self.stream(prompt_ids, params):
            out.extend(step.token_ids)
        return out, step

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[StepOutput]:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.target.max_len:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens; the context holds {self.target.max_len}"
            )
        stops = set(self.eos_token_ids) | set(params.stop_token_ids)
        params = params.seeded()  # the drafter races the same noise as the verifier
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        next_round = self._rounds(params, stats)
        t0 = time.perf_counter()
        tokens = list(prompt_ids)
        if self.drafter is not None:
            self.drafter.start(tokens, params)
        slot, prefixes = int(self.slot[0]), self.target.prefixes
        try:
            # Prefill: the prompt's last logits give the first token. What the slot holds of
            # the prompt already (the last request's) is not run again.
            stats.cached_tokens = prefixes.reusable(slot, tokens)
            logits = self._prefill(tokens, stats.cached_tokens, stats)
            prefixes.hold(slot, tokens)
            if self.drafter is not None:
                self.drafter.observe(tokens, logits)
            verdict = verify(logits, EMPTY_DRAFT, params, len(tokens))
            new = [verdict.next_token]
            stats.time_to_first_token_s = time.perf_counter() - t0
            while True:
                room = min(
                    params.max_new_tokens - stats.new_tokens, self.target.max_len - len(tokens)
                )
                new, finish = clip_new_tokens(new, room, stops)
                tokens += new
                stats.new_tokens += len(new)
                if finish:
                    stats.wall_s = time.perf_counter() - t0
                    prefixes.hold(slot, tokens[:-1])  # the invariant: all but the newest
                    yield StepOutput(new, finish, stats)
                    return
                yield StepOutput(new)
                new = next_round(tokens)
        finally:
            if self.drafter is not None:
                self.drafter.finish()

    def _rounds(self, params, stats) -> Callable[[list[int]], list[int]]:
        """A request's round function: verified tokens so far -> the next new tokens."""
        fixed = not self.adaptive or (self.drafter is not None and self.drafter.sizes_itself)
        policy = DraftLengthPolicy(max_k=self.gamma, fixed=fixed, costs=self.costs)
        return lambda tokens: self._round(tokens, params, stats, policy)

    def _round(self, tokens, params, stats, policy) -> list[int]:
        remaining = params.max_new_tokens - stats.new_tokens
        draft, draft_s = EMPTY_DRAFT, 0.0
        if self.drafter is not None:
            room = self.target.max_len - len(tokens)
            k = min(policy.next_k(), remaining - 1, room)
            if k > 0:
                t = time.perf_counter()
                self.drafter.price_nodes(policy.node_prices(k))
                draft = self.drafter.propose(tokens, k)[:room]  # a tree may be wider than k
                draft_s = time.perf_counter() - t
                stats.draft_s += draft_s
        chunk = [tokens[-1], *draft.tokens]
        t = time.perf_counter()
        mask = tree.attention_mask(draft.parents) if draft.is_tree else None
        logits = self._target_forward(chunk, len(tokens) - 1, stats, tree_mask=mask)
        if self.drafter is not None:
            self.drafter.observe(chunk, logits)
        verdict = verify(logits, draft, params, len(tokens))
        if verdict.path:  # a tree's accepted nodes' K/V into sequence order
            rows = tree.accepted_rows(len(tokens) - 1, verdict.path)
            self.target.move_kv(int(self.slot[0]), *rows)
        verify_s = time.perf_counter() - t
        policy.observe_round(tree.depth(draft), verdict.num_accepted, draft_s, verify_s)
        stats.count_verdict(len(draft), verdict.num_accepted)
        return verdict.tokens(draft)

    def _prefill(self, tokens: list[int], start: int, stats) -> torch.Tensor:
        """tokens[start:] into the cache, in forwards of at most the target's prefill_rows;
        the last one's logits. Counted as one target forward (tau is about decoding)."""
        rows = self.target.prefill_rows() or len(tokens)
        for at in range(start, len(tokens), rows):
            logits = self._target_forward(tokens[at : at + rows], at, stats, last=1)
        stats.target_forwards -= len(range(start, len(tokens), rows)) - 1
        return logits

    def _target_forward(self, chunk, start, stats, last=0, tree_mask=None) -> torch.Tensor:
        t = time.perf_counter()
        pos = torch.arange(start, start + len(chunk))[None]
        mask = None if tree_mask is None else tree_mask[None]
        logits = self.target(torch.tensor([chunk]), pos, self.slot, last=last, tree=mask)[0]
        stats.verify_s += time.perf_counter() - t
        stats.target_forwards += 1
        return logits


def clip_new_tokens(new: list[int], room: int, stops: set[int]) -> tuple[list[int], str | None]:
    """Cut new tokens to room (what max_new_tokens and the context leave), then after the
    first stop token (kept); the finish reason, if this ends the request."""
    new = new[:room]
    for i, tok in enumerate(new):
        if tok in stops:
            return new[: i + 1], "stop"
    return new, ("length" if len(new) == room else None)
