"""Token trees: a draft of several candidate continuations verified in one target forward.

A tree is its nodes' tokens and parent indices (-1: the last verified token, the root), each
node after its parent. The target reads [root, node_0, ..., node_(n-1)] as one chunk whose
attention follows the tree (`attention_mask`): a node sees the sequence before the chunk and
its own ancestors, at position start + its depth. Its K/V land at cache row start + 1 + its
index; after the verdict the accepted path's rows move to start + 1 + depth (`accepted_rows`),
so the cache again holds the sequence in order and rollback stays a position change.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

import torch


def check_parents(parents: list[int]) -> None:
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"tree node {i} has parent {p}: a parent comes before its children")


def is_chain(parents: list[int]) -> bool:
    return all(p == i - 1 for i, p in enumerate(parents))


def depths(parents: list[int]) -> list[int]:
    """Each node's depth: 1 for the root's children."""
    out: list[int] = []
    for p in parents:
        out.append(1 if p < 0 else out[p] + 1)
    return out


def depth(draft) -> int:
    """The longest path of a Draft (its length, for a chain)."""
    return max(depths(draft.parents)) if draft.is_tree else len(draft)


def attention_mask(parents: list[int]) -> torch.Tensor:
    """[n + 1, n + 1] bool over the chunk [root, nodes...]: row r sees column c where c is r
    or one of its ancestors."""
    n = len(parents)
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask[0, 0] = True
    for i, p in enumerate(parents):
        mask[i + 1] = mask[p + 1]
        mask[i + 1, i + 1] = True
    return mask


def chunk_attention(n: int, parents: list[int], width: int | None = None) -> torch.Tensor:
    """[width, width] bool for a chunk of n tokens (right-padded to width) whose last
    len(parents) are a tree hanging from the token before them: causal order elsewhere."""
    width = n if width is None else width
    mask = torch.ones(width, width, dtype=torch.bool).tril()
    if parents:
        root = n - len(parents) - 1
        mask[root:n, root:n] = attention_mask(parents)
    return mask


def children(parents: list[int], tokens: list[int]) -> dict[int, dict[int, int]]:
    """node (-1: root) -> {token: child node}; the first child wins among equal tokens."""
    out: dict[int, dict[int, int]] = {}
    for i, (p, tok) in enumerate(zip(parents, tokens, strict=True)):
        out.setdefault(p, {}).setdefault(tok, i)
    return out


def accepted_path(draft, tokens: list[int]) -> list[int]:
    """The nodes of a Draft that tokens (what followed its root) run along, in order."""
    if not draft.is_tree:
        n = 0
        while n < min(len(draft), len(tokens)) and draft.tokens[n] == tokens[n]:
            n += 1
        return list(range(n))
    kids = children(draft.parents, draft.tokens)
    path: list[int] = []
    node = -1
    while (
        len(path) < len(tokens) and (nxt := kids.get(node, {}).get(tokens[len(path)])) is not None
    ):
        path.append(nxt)
        node = nxt
    return path


def accepted_rows(start: int, path: list[int]) -> tuple[list[int], list[int]]:
    """(cache rows the accepted path's K/V were written to, the rows they belong in), for a
    chunk whose root is at cache row start."""
    return [start + 1 + i for i in path], [start + 1 + d for d in range(len(path))]


def price_at(prices: tuple[float, ...], i: int) -> float:
    """What the (i+1)-th node of a draft must be worth (Drafter.price_nodes)."""
    return prices[min(i, len(prices) - 1)] if prices else 0.0


def best_first(
    expand: Callable[[list[int]], list[tuple[int, float]]],
    budget: int,
    max_depth: int,
    prices: tuple[float, ...] = (),
    width: int = 1,
    floor: float = 0.0,
) -> tuple[list[int], list[int]]:
    """A tree grown best first: (tokens, parents). expand(path) gives the candidates after a
    path from the root (token, its chance given the path), best first; a node's score is
    the product of the chances on its path. Nodes are taken in order of score while the
    score pays for the next node (price_at(prices, i)) and is at least floor, at most
    `budget` of them, `width` children per node, `max_depth` deep."""
    tokens: list[int] = []
    parents: list[int] = []
    paths: list[list[int]] = []
    heap: list[tuple[float, int, int, int, list[int]]] = []  # (-score, tie, parent, token, path)
    tie = itertools.count()

    def push(parent: int, path: list[int], score: float) -> None:
        if len(path) < max_depth:
            for tok, p in expand(path)[:width]:
                heapq.heappush(heap, (-score * p, next(tie), parent, tok, path))

    push(-1, [], 1.0)
    while heap and len(tokens) < budget:
        neg, _, parent, tok, path = heapq.heappop(heap)
        if -neg < max(floor, price_at(prices, len(tokens))):
            break
        tokens.append(tok)
        parents.append(parent)
        paths.append(path + [tok])
        push(len(tokens) - 1, paths[-1], -neg)
    return tokens, parents
