"""Drafting for many requests at once: one batched forward per drafting step.

Each request keeps its own ModelDrafter (its KV slot, cache bookkeeping, prompt lookup) over
one shared model; their `drafting` steps advance in lockstep and every step's forwards, one
per request, run as one right-padded batch (the target's batched step does the same). A
decode-shaped forward reads the weights once whatever the batch, so with a copy of the target
as drafter, drafting for 16 sessions costs little more than drafting for one. The drafts are
the ones each drafter would make alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distspec.spec_decode.draft_policy import dummy_context, timed
from distspec.spec_decode.drafter import Draft
from distspec.spec_decode.drafters.model import DraftForward, ModelDrafter, forward_together
from distspec.spec_decode.sampling import SamplingParams


def propose_together(
    drafters: Sequence[ModelDrafter], contexts: Sequence[list[int]], ks: Sequence[int]
) -> list[Draft]:
    """drafters[i].propose(contexts[i], ks[i]) for every i; the drafters share one model
    (each in its own KV slot)."""
    steps = [d.drafting(c, k) for d, c, k in zip(drafters, contexts, ks, strict=True)]
    return run_together(drafters, steps)


def read_together(drafters: Sequence[ModelDrafter], contexts: Sequence[list[int]]) -> None:
    """drafters[i] reads contexts[i] (ModelDrafter.reading) for every i, in one forward."""
    run_together(drafters, [d.reading(c) for d, c in zip(drafters, contexts, strict=True)])


def run_together(drafters: Sequence[ModelDrafter], steps: list) -> list[Draft]:
    """Run each drafter's step generator (drafting or reading), every round of forwards they
    ask for batched into one forward of the shared model."""
    model = drafters[0].model
    if any(d.model is not model for d in drafters):
        raise ValueError("drafting together needs drafters of one model")
    drafts: list[Draft | None] = [None] * len(steps)
    asks: dict[int, DraftForward] = {}

    def advance(i: int, rows: torch.Tensor | None) -> None:
        try:
            asks[i] = next(steps[i]) if rows is None else steps[i].send(rows)
        except StopIteration as done:
            drafts[i] = done.value
            asks.pop(i, None)

    for i in range(len(steps)):
        advance(i, None)
    while asks:
        by_groups: dict[tuple, list[int]] = {}
        for i, ask in asks.items():  # EasySpec's exact and fuzzy forwards run apart
            by_groups.setdefault(ask.groups, []).append(i)
        for members in by_groups.values():
            batch = [asks[i] for i in members]
            slots = torch.cat([drafters[i].slot for i in members])
            for i, rows in zip(members, forward_together(model, batch, slots), strict=True):
                advance(i, rows)
    return drafts  # type: ignore[return-value]


def time_drafting_together(
    drafters: Sequence[ModelDrafter], vocab_size: int, k: int, context_len: int = 64
) -> tuple[tuple[int, float], ...]:
    """((sessions, seconds per drafting step), ...) for 1, 4, 16, ... sessions at once, up to
    len(drafters) (one per KV slot), drafting k tokens after a context with nothing to look
    up (medians of 3)."""
    context = dummy_context(vocab_size, context_len)
    sizes = sorted({n for n in (1, 4, 16, 64) if n <= len(drafters)} | {len(drafters)})
    out = []
    for n in sizes:
        group = list(drafters[:n])
        for d in group:
            d.start(context, SamplingParams())
        propose_together(group, [context] * n, [k] * n)  # fills the caches
        step_s = timed(lambda g=group: propose_together(g, [context] * len(g), [k] * len(g)), 3)
        for d in group:
            d.finish()
        out.append((n, step_s / k))
    return tuple(out)
