"""Token trees: a draft of several candidate continuations verified in one target forward.

A tree is its nodes' tokens and parent indices (-1: the last verified token, the root), each
node after its parent. The target reads [root, node_0, ..., node_(n-1)] as one chunk whose
attention follows the tree (`attention_mask`): a node sees the sequence before the chunk and
its own ancestors, at position start + its depth. Its K/V land at cache row start + 1 + its
index; after the verdict the accepted path's rows move to start + 1 + depth (`accepted_rows`),
so the cache again holds the sequence in order and rollback stays a position change.
"""

from __future__ import annotations

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


def children(parents: list[int], tokens: list[int]) -> dict[int, dict[int, int]]:
    """node (-1: root) -> {token: child node}; the first child wins among equal tokens."""
    out: dict[int, dict[int, int]] = {}
    for i, (p, tok) in enumerate(zip(parents, tokens, strict=True)):
        out.setdefault(p, {}).setdefault(tok, i)
    return out


def accepted_rows(start: int, path: list[int]) -> tuple[list[int], list[int]]:
    """(cache rows the accepted path's K/V were written to, the rows they belong in), for a
    chunk whose root is at cache row start."""
    return [start + 1 + i for i in path], [start + 1 + d for d in range(len(path))]


def merge_paths(paths: list[list[int]], budget: int) -> tuple[list[int], list[int]]:
    """A trie of candidate continuations, best first, cut at `budget` nodes: (tokens, parents).
    A later path adds only the nodes it does not share with earlier ones."""
    tokens: list[int] = []
    parents: list[int] = []
    index: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    for path in paths:
        parent = -1
        for tok in path:
            node = index.get((parent, tok))
            if node is None:
                if len(tokens) >= budget:
                    break
                node = index[(parent, tok)] = len(tokens)
                tokens.append(tok)
                parents.append(parent)
            parent = node
    return tokens, parents
