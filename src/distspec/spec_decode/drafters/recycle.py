"""Token Recycling: draft from the target's own earlier candidates, with no model.

Every target forward predicts, after each token it reads, a distribution whose top-k the
verifier uses one of and throws the rest away. Here they are kept: an adjacency table
[vocabulary, top_k] holds, per token, the target's top-k next tokens from the last time it
read that token, with their probabilities (overwritten every round, kept across requests).
A draft walks the table from the sequence's newest token: the top-1 chain, or with
tree_width > 1 a tree of up to tree_width children per node grown best first by the product
of the nodes' chances along each path (tree.best_first), down to the node price. A node's
chance is how often this drafter's nodes of its stored probability (in fifths) were accepted
so far (NodeCalibration): a probability from another context is no chance in this one.
"""

from __future__ import annotations

import torch

from distspec.spec_decode.drafter import Draft, Drafter
from distspec.spec_decode.drafters.calibration import NodeCalibration
from distspec.spec_decode.sampling import SamplingParams
from distspec.spec_decode.tree import best_first

TOP_K = 8
PROB_BUCKETS = 5


class RecycleDrafter(Drafter):
    name = "recycle"
    prior_acceptance = 0.4
    sizes_itself = True

    def __init__(self, vocab_size: int, tree_width: int = 1, top_k: int = TOP_K):
        if not 1 <= tree_width <= top_k:
            raise ValueError(f"tree_width must be in [1, {top_k}], got {tree_width}")
        self.tree_width, self.top_k = tree_width, top_k
        self.table = torch.full((vocab_size, top_k), -1, dtype=torch.long)
        self.probs = torch.zeros(vocab_size, top_k)
        self.prices: tuple[float, ...] = ()
        self.calibration = NodeCalibration(PROB_BUCKETS, prior=0.3)

    def price_nodes(self, prices: tuple[float, ...]) -> None:
        self.prices = tuple(prices)

    def start(self, prompt_ids: list[int], params: SamplingParams) -> None:
        return None  # the table outlives requests: that is the recycling

    def forget(self) -> None:
        self.table.fill_(-1)
        self.probs.zero_()
        self.calibration.forget()

    def observe(self, chunk: list[int], logits: torch.Tensor) -> None:
        rows = torch.tensor(chunk[len(chunk) - len(logits) :])
        top = torch.topk(logits.float().softmax(-1), self.top_k, dim=-1)
        self.table[rows] = top.indices.cpu()
        self.probs[rows] = top.values.cpu()

    def propose(self, context: list[int], k: int) -> Draft:
        self.calibration.verified(context)
        if k <= 0:
            return Draft([])
        root = context[-1]
        bucket_of: dict[tuple[int, int], int] = {}  # (token, a next token in its row)

        def expand(path: list[int]) -> list[tuple[int, float]]:
            tok = path[-1] if path else root
            out = []
            for t, p in zip(self.table[tok].tolist(), self.probs[tok].tolist(), strict=True):
                if t >= 0:
                    b = bucket_of[tok, t] = min(int(p * PROB_BUCKETS), PROB_BUCKETS - 1)
                    out.append((t, self.calibration.rate(b)))
            return sorted(out, key=lambda o: -o[1])

        width = self.tree_width
        tokens, parents = best_first(expand, k * width, k, self.prices, width)
        draft = Draft(tokens, parents)
        before = [root if p < 0 else tokens[p] for p in parents]
        buckets = [bucket_of[b, t] for b, t in zip(before, tokens, strict=True)]
        self.calibration.drafted(len(context), draft, buckets)
        return draft
