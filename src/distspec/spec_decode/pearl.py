"""PEARL: drafting and verification at the same time (../shared/design/algorithms.md section 2).

Each round the target verifies [newest verified token, *pending] while the drafter drafts the
next gamma tokens after verified + pending, as if the pending tokens were all accepted. When
both are done, the drafter's first token is checked against the target's last row:

- pre-verify (nothing pending): the target's round is a one-token step that checks only the
  drafter's first token; a bad draft dies after one token, without a full verify pass;
- post-verify: if the pending tokens and the new first token are all accepted, the rest of the
  new draft becomes pending and no time was lost; a run of such rounds is a draft of any
  length, so the draft length adapts by itself.

At a rejection the correction is emitted and the pending tokens are dropped; the target's cache
needs no operation (positions are simply reused) and the drafter resynchronises on the shorter
context. `PearlState` is only this bookkeeping; the one verifier decides, so the state machine
runs unchanged in one process (`PearlDecoder`) and in the distributed runtime.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from distspec.models.llama import Transformer
from distspec.models.openmp import call_then_release
from distspec.spec_decode.decoding import SpeculativeDecoder, StepOutput
from distspec.spec_decode.draft_policy import DraftCosts, ema
from distspec.spec_decode.drafter import EMPTY_DRAFT, Draft, Drafter
from distspec.spec_decode.sampling import SamplingParams
from distspec.spec_decode.verify import Verdict, verify


@dataclass
class PearlState:
    """One request's PEARL bookkeeping, given the verified tokens (prompt + output so far)."""

    pending: Draft = field(default_factory=lambda: EMPTY_DRAFT)

    @property
    def mode(self) -> str:
        return "post" if self.pending.tokens else "pre"

    def target_chunk(self, tokens: list[int]) -> tuple[int, list[int]]:
        """(position of the chunk's first token, the chunk) the target runs this round."""
        return len(tokens) - 1, [tokens[-1], *self.pending.tokens]

    def draft_context(self, tokens: list[int]) -> list[int]:
        """What the drafter drafts after this round."""
        return tokens + self.pending.tokens

    def candidate(self, draft: Draft) -> Draft:
        """The tokens the target's rows decide on: pending + the draft's first token (the row
        after that does not exist yet). With an empty draft, pending + the bonus token."""
        return self.pending + draft[:1]

    def apply(self, verdict: Verdict, draft: Draft) -> list[int]:
        """Apply the verdict on candidate(draft); return the new verified tokens."""
        new = verdict.tokens(self.candidate(draft))
        self.pending = draft[1:] if verdict.next_token is None else EMPTY_DRAFT
        return new


def pearl_gamma(costs: DraftCosts | None, max_gamma: int) -> int:
    """PEARL's rule: the drafter drafts gamma tokens while the target verifies a chunk of
    gamma rows (the newest token and gamma - 1 pending ones), so neither waits for the other
    when gamma * t_draft ~ t_verify(gamma rows): the largest gamma up to max_gamma whose
    draft takes no longer than that verify (at least 1); max_gamma without a measurement.
    (t_target / t_draft, PEARL's paper rule, undercounts on a CPU: a 5-row verify costs 1.1x
    a step, so the drafter idled.)"""
    if costs is None or costs.t_draft <= 0:
        return max_gamma
    fits = [g for g in range(1, max_gamma + 1) if g * costs.t_draft <= costs.t_verify(g)]
    return max(fits, default=1)


def pearl_batch_gamma(costs: DraftCosts, max_gamma: int, batch: int, per_drafter: int) -> int:
    """PEARL's draft length for `batch` sessions verified together, each drafter drafting its
    `per_drafter` of them in one batched step a token (drafters/batched.py): the gamma whose
    round makes the most tokens a second. A round verifies every session's gamma rows while
    the drafters take gamma steps, so it lasts max(t_verify(batch * gamma), gamma *
    t_draft_at(per_drafter)) and makes about (1 - a^gamma) / (1 - a) tokens a session (a:
    the drafter's acceptance). Where the verify turns compute-bound (a few sessions on one
    core) the longest draft that fits is not the fastest: 4 sessions, self drafter, one core
    each: gamma 8 fits, gamma 4 makes 1.1x its tokens a second."""
    a = min(costs.prior_alpha, 0.99)
    t_draft = costs.t_draft_at(per_drafter)

    def rate(g: int) -> float:
        return (1 - a**g) / (1 - a) / max(costs.t_verify(batch * g), g * t_draft)

    return max(range(1, max_gamma + 1), key=lambda g: (rate(g), -g))


@dataclass
class PearlPace:
    """PEARL's draft length live, from the target's part of a round (T) and the drafter's
    seconds per token (t) as measured in the last rounds: one token past the balance,
    ceil(T / t) + 1, up to max_gamma. A round takes max(T, k t) for about k tokens, so short
    of the balance the rate falls with k and past it stays 1 / t: erring long costs only the
    tokens a rejection drops. The start-up costs time each side alone, but at once they share
    the memory bus. Measured on one core each (4 prompts, alternating): the start-up rule's
    fixed 5 tokens 40.7 tokens/s, the live balance itself 40.3, one past it 43.9."""

    max_gamma: int
    gamma: int
    decay: float = 0.7
    _target_s: float | None = None
    _token_s: float | None = None

    def observe(self, target_s: float, draft_s: float, drafted: int) -> None:
        self._target_s = ema(self._target_s, target_s, self.decay)
        if drafted:
            self._token_s = ema(self._token_s, draft_s / drafted, self.decay)
        if self._token_s:
            past = math.ceil(self._target_s / self._token_s) + 1
            self.gamma = max(1, min(self.max_gamma, past))


class PearlDecoder(SpeculativeDecoder):
    """PEARL in one process: the drafter drafts in a second thread while the target verifies
    (PyTorch releases the GIL inside its kernels, so the two really overlap)."""

    def __init__(
        self,
        target: Transformer,
        drafter: Drafter,
        gamma: int = 8,
        eos_token_ids: list[int] | None = None,
        slot: int = 0,
        costs: DraftCosts | None = None,
        resume: str = "pre",
    ):
        """gamma: the longest draft per round; with costs, PEARL's rule picks it (pearl_gamma).
        resume: with nothing pending (the start, after a rejection) run a pre-verify round
        ("pre": the target checks the drafter's first token while the drafter drafts on) or
        draft first, alone ("post")."""
        if resume not in ("pre", "post"):
            raise ValueError(f"resume must be pre or post, got {resume!r}")
        self.resume = resume
        super().__init__(target, drafter, gamma, eos_token_ids, slot, costs=costs)
        self.max_gamma = gamma
        self.gamma = pearl_gamma(costs, gamma)  # the first rounds' draft length
        self._drafting: ThreadPoolExecutor | None = None

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[StepOutput]:
        # a drafting thread per request: a thread that lives on keeps its OpenMP team, which
        # measured halves the speed of the other threads' parallel work (SD in the same
        # process after a PEARL request: 49 against 83 tokens/s)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pearl-drafter") as drafting:
            self._drafting = drafting
            try:
                yield from super().stream(prompt_ids, params)
            finally:
                self._drafting = None

    def _rounds(self, params, stats) -> Callable[[list[int]], list[int]]:
        state = PearlState()
        pace = PearlPace(self.max_gamma, self.gamma)

        def next_round(tokens: list[int]) -> list[int]:
            if self.resume == "post" and state.mode == "pre":
                self._draft_first(state, tokens, params, stats, pace)
            start, chunk = state.target_chunk(tokens)
            context = state.draft_context(tokens)
            remaining = params.max_new_tokens - stats.new_tokens - len(state.pending)
            k = min(pace.gamma, remaining - 1, self.target.max_len - len(context))
            drafting = (
                self._drafting.submit(call_then_release, self._propose, context, k)
                if k > 0
                else None
            )
            t = time.perf_counter()
            logits = self._target_forward(chunk, start, stats)
            target_s = time.perf_counter() - t
            draft, draft_s = drafting.result() if drafting else (EMPTY_DRAFT, 0.0)
            stats.draft_s += draft_s
            if k == pace.gamma:  # a draft cut short by the request's end says less
                pace.observe(target_s, draft_s, len(draft))
            candidate = state.candidate(draft)
            verdict = verify(logits, candidate, params, start + 1)
            stats.count_verdict(len(candidate), verdict.num_accepted)
            return state.apply(verdict, draft)

        return next_round

    def _draft_first(self, state: PearlState, tokens, params, stats, pace: PearlPace) -> None:
        """Post-verify resumption: with nothing pending (the start, after a rejection), draft
        alone first, as SD does, so that this round verifies a whole draft."""
        remaining = params.max_new_tokens - stats.new_tokens
        k = min(pace.gamma, remaining - 1, self.target.max_len - len(tokens))
        if k > 0:
            draft, draft_s = self._drafting.submit(
                call_then_release, self._propose, tokens, k
            ).result()
            stats.draft_s += draft_s
            state.pending = draft

    def _propose(self, context: list[int], k: int) -> tuple[Draft, float]:
        t = time.perf_counter()
        draft = self.drafter.propose(context, k)
        return draft, time.perf_counter() - t
