"""The one verifier, shared by every drafter and mode: accept the draft's longest prefix that
equals the target's own choices.

Given target logits for [last token, d_1..d_k] (k + 1 rows), row i holds the target's
distribution for the position of d_(i+1). The target's choice there is its argmax (greedy) or
its draw with the position's race noise (sampling.draw): the token plain decoding with the same
seed would emit. The draft's prefix that matches these choices is accepted and one more of them
added: the correction at the first mismatch, or a bonus token when all k match. Output is thus
the target's own choices, token for token, whatever was drafted; a drafter that races its own
distribution against the same noise matches with probability close to 1 - TV(p, q), the
acceptance of rejection sampling (measured, and why this rule: docs/sampling.md).

With only k rows (PEARL checks a drafter's first token against the row after the pending
ones: no row beyond it exists yet) there is no bonus: all k accepted gives next_token None.

A tree draft (spec_decode/tree.py; its rows follow the chunk [root, nodes...]) is walked the
same way: from the root, the child whose token is the target's choice at the current node, at
position pos + the node's depth, until no child matches: the longest accepted path, then the
correction or bonus. Siblings share a position and so its noise: the output is still the
target's own draw at every position, whichever candidates the tree held.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from distspec.spec_decode import tree
from distspec.spec_decode.drafter import Draft
from distspec.spec_decode.sampling import SamplingParams, draw, probs_from_logits


@dataclass
class Verdict:
    num_accepted: int
    next_token: int | None  # correction (first rejection), bonus (all accepted) or None
    path: list[int] | None = None  # a tree's accepted nodes, root's child first

    def tokens(self, draft: Draft) -> list[int]:
        bonus = [] if self.next_token is None else [self.next_token]
        if self.path is not None:
            return [draft.tokens[i] for i in self.path] + bonus
        return draft.tokens[: self.num_accepted] + bonus


def verify(logits: torch.Tensor, draft: Draft, params: SamplingParams, pos: int) -> Verdict:
    """logits: [k + 1, V] target logits (or [k, V]: no bonus); draft: k tokens (k may be 0);
    pos: the sequence position of the token row 0 decides (of d_1, or of the next token)."""
    k = len(draft)
    rows = logits.shape[0]
    if rows not in (k, k + 1) or rows == 0 or (draft.is_tree and rows != k + 1):
        raise ValueError(f"need {k + 1} or {k} logit rows for a draft of {k}, got {rows}")
    choice = _choices(logits, params)
    if draft.is_tree:
        return _walk(draft, choice, pos)
    n = 0
    while n < k and draft.tokens[n] == choice(n, pos + n):
        n += 1
    return Verdict(n, choice(n, pos + n) if n < rows else None)


def _walk(draft: Draft, choice: Callable[[int, int], int], pos: int) -> Verdict:
    kids = tree.children(draft.parents, draft.tokens)
    path: list[int] = []
    node = -1
    while True:
        tok = choice(node + 1, pos + len(path))
        nxt = kids.get(node, {}).get(tok)
        if nxt is None:
            return Verdict(len(path), tok, path)
        path.append(nxt)
        node = nxt


def _choices(logits: torch.Tensor, params: SamplingParams) -> Callable[[int, int], int]:
    """(row, its position) -> the target's token there: its argmax, or its draw (needs
    params.seed); draws are made only for the rows asked about."""
    if params.greedy:
        best = logits.argmax(-1).tolist()
        return lambda row, _pos: best[row]
    if params.seed is None:
        raise ValueError("sampled verification needs the request's seed (SamplingParams.seeded)")
    probs = probs_from_logits(logits, params)
    return lambda row, at: int(draw(probs[row], params.seed, at)[0])
