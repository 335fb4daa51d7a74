"""The one verifier, shared by every drafter: greedy matching and lossless rejection sampling.

Given target logits for [last token, d_1..d_k] (k + 1 rows) it accepts a prefix of the draft
and adds one token from the target: the correction at the first rejection, or a bonus token
when all k are accepted. See ../shared/design/algorithms.md section 1.

With only k rows (PEARL checks a drafter's first token against the row after the pending
ones: no row beyond it exists yet) there is no bonus: all k accepted gives next_token None.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distspec.spec_decode.drafter import Draft
from distspec.spec_decode.sampling import SamplingParams, probs_from_logits, sample


@dataclass
class Verdict:
    num_accepted: int
    next_token: int | None  # correction (first rejection), bonus (all accepted) or None

    def tokens(self, draft: Draft) -> list[int]:
        bonus = [] if self.next_token is None else [self.next_token]
        return draft.tokens[: self.num_accepted] + bonus


def verify(
    logits: torch.Tensor, draft: Draft, params: SamplingParams, generator: torch.Generator
) -> Verdict:
    """logits: [k + 1, V] target logits (or [k, V]: no bonus); draft: k tokens (k may be 0)."""
    k = len(draft)
    rows = logits.shape[0]
    if rows not in (k, k + 1) or rows == 0:
        raise ValueError(f"need {k + 1} or {k} logit rows for a draft of {k}, got {rows}")
    if params.greedy:
        return _verify_greedy(logits, draft)
    return _verify_sampled(probs_from_logits(logits, params), draft, generator)


def _verify_greedy(logits: torch.Tensor, draft: Draft) -> Verdict:
    best = logits.argmax(-1).tolist()
    n = 0
    while n < len(draft) and draft.tokens[n] == best[n]:
        n += 1
    return Verdict(n, best[n] if n < len(best) else None)


def _verify_sampled(p: torch.Tensor, draft: Draft, generator: torch.Generator) -> Verdict:
    k = len(draft)
    if k == 0:
        return Verdict(0, sample(p[0], generator))
    ids = torch.tensor(draft.tokens)
    rows = torch.arange(k)
    p_draft = p[rows, ids]
    if draft.probs is None:  # point-mass q: accept with probability p(d)
        ratio = p_draft
    else:
        q_draft = draft.probs[rows, ids].float()
        ratio = p_draft / q_draft.clamp_min(1e-30)
    uniforms = torch.rand(k, generator=generator)
    rejected = (uniforms >= ratio).nonzero()
    if len(rejected) == 0:
        return Verdict(k, sample(p[k], generator) if len(p) > k else None)
    n = int(rejected[0])
    if draft.probs is None:
        residual = p[n].clone()
        residual[draft.tokens[n]] = 0
    else:
        residual = (p[n] - draft.probs[n].float()).clamp_min(0)
    total = residual.sum()
    # A rejection implies p(d) < q(d), so the residual has mass; guard float round-off anyway.
    residual = residual / total if total > 0 else p[n]
    return Verdict(n, sample(residual, generator))
