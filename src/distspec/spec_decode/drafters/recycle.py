"""Token Recycling: draft from the target's own earlier candidates, with no model.

Every target forward predicts, after each token it reads, a distribution whose top-k the
verifier uses one of and throws the rest away. Here they are kept: an adjacency table
[vocabulary, top_k] holds, per token, the target's top-k next tokens from the last time it
read that token (overwritten every round, kept across requests). A draft walks the table from
the sequence's newest token: the top-1 chain, or with tree_width > 1 a breadth-first tree
whose nodes have tree_width children at depth 1, one fewer at each depth below (at least 1).
"""

from __future__ import annotations

import torch

from distspec.spec_decode.drafter import Draft, Drafter
from distspec.spec_decode.sampling import SamplingParams

TOP_K = 8


class RecycleDrafter(Drafter):
    name = "recycle"
    prior_acceptance = 0.4

    def __init__(self, vocab_size: int, tree_width: int = 1, top_k: int = TOP_K):
        if not 1 <= tree_width <= top_k:
            raise ValueError(f"tree_width must be in [1, {top_k}], got {tree_width}")
        self.tree_width, self.top_k = tree_width, top_k
        self.table = torch.full((vocab_size, top_k), -1, dtype=torch.long)

    def start(self, prompt_ids: list[int], params: SamplingParams) -> None:
        return None  # the table outlives requests: that is the recycling

    def forget(self) -> None:
        self.table.fill_(-1)

    def observe(self, chunk: list[int], logits: torch.Tensor) -> None:
        rows = chunk[len(chunk) - len(logits) :]
        top = torch.topk(logits.float(), self.top_k, dim=-1).indices.cpu()
        self.table[torch.tensor(rows)] = top

    def propose(self, context: list[int], k: int) -> Draft:
        if k <= 0:
            return Draft([])
        budget = k * self.tree_width
        tokens: list[int] = []
        parents: list[int] = []
        level = [(-1, context[-1])]  # (node, token) of the deepest nodes so far
        for depth in range(k):
            width = max(1, self.tree_width - depth)
            nxt = []
            for node, tok in level:
                for child in self.table[tok, :width].tolist():
                    if child < 0 or len(tokens) >= budget:
                        break
                    nxt.append((len(tokens), child))
                    tokens.append(child)
                    parents.append(node)
            if not nxt:
                break
            level = nxt
        return Draft(tokens, parents)
