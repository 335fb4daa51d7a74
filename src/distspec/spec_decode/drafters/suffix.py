"""Suffix decoding: draft what followed the longest match of the sequence's end, in the request
itself and in earlier outputs, the most frequent continuation first (SuffixDecoding, SAM
decoding).

`SuffixIndex` maps every n-gram (n <= max_match) of the sequences it holds to where it ended,
the newest occurrences kept. A draft starts from the longest n-gram ending the context that
occurred before with something after it; the continuations after its occurrences (request
and store alike) are counted into a trie, each weighted by its recency (RECENCY: the newest
counts most), and drafted best first by that weight: one chain, or
with tree_width > 1 a tree of the top continuations (each node's children cut to tree_width).
A token's chance is the share of continuations behind it times how often this drafter's
tokens from matches of that length were accepted so far (NodeCalibration: a share of 1
from one earlier occurrence is no certainty); a draft grows best first while its nodes' chances
pay their verify rows (Drafter.price_nodes), and no deeper than MATCH_FACTOR tokens per
matched one.

`SuffixStore` is the cross-request part: finished outputs of one model, bounded by total
tokens, the oldest evicted first. The server keeps one per model and tenant (never across
tenants); `generate` one per engine.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from distspec.spec_decode.drafter import Draft, Drafter
from distspec.spec_decode.drafters.calibration import NodeCalibration
from distspec.spec_decode.sampling import SamplingParams
from distspec.spec_decode.tree import best_first

MAX_MATCH = 12  # longest n-gram indexed
MAX_OCCURRENCES = 16  # newest occurrences kept per n-gram
MATCH_FACTOR = 2  # draft at most this many tokens per matched token (then the drafter's k)
MIN_SHARE = 0.1  # a continuation drafted only if this share of the occurrences go on with it
# an occurrence weighs RECENCY times the next newer one: in edits and rewrites the newest
# version of a text is the one copied (repetitive workload, docs/trees.md: tau 2.71 -> 2.89)
RECENCY = 0.5
# the calibration's verdicts age by this much a round: chances follow the stretch of text the
# request is in (a run of copying) more than its average
CALIBRATION_DECAY = 0.7


class SuffixIndex:
    """n-gram -> [(sequence id, index after the n-gram)], newest last."""

    def __init__(self, max_match: int = MAX_MATCH, max_occurrences: int = MAX_OCCURRENCES):
        self.max_match, self.max_occurrences = max_match, max_occurrences
        self.seqs: dict[int, list[int]] = {}
        self._at: dict[tuple[int, ...], deque[tuple[int, int]]] = {}

    def extend(self, seq_id: int, tokens: list[int]) -> None:
        """Append tokens to sequence seq_id (new if unknown), indexing the n-grams they end."""
        seq = self.seqs.setdefault(seq_id, [])
        done = len(seq)
        seq.extend(tokens)
        for end in range(max(done, 1), len(seq) + 1):
            for n in range(1, min(self.max_match, end) + 1):
                key = tuple(seq[end - n : end])
                occ = self._at.get(key)
                if occ is None:
                    occ = self._at[key] = deque(maxlen=self.max_occurrences)
                occ.append((seq_id, end))

    def drop(self, seq_id: int) -> None:
        """Forget a sequence (its occurrences are skipped from now on, then age out)."""
        self.seqs.pop(seq_id, None)

    def occurrences(self, key: tuple[int, ...]) -> list[tuple[int, int]]:
        return [o for o in self._at.get(key, ()) if o[0] in self.seqs]

    def prune(self) -> None:
        """Drop occurrences of forgotten sequences (bounds memory after evictions)."""
        for key in [k for k, occ in self._at.items() if not any(o[0] in self.seqs for o in occ)]:
            del self._at[key]


@dataclass
class SuffixStore:
    """Finished outputs of one model for later requests to draft from: at most max_tokens in
    all, the oldest evicted first. Thread-safe (a server's sessions finish concurrently)."""

    max_tokens: int = 1 << 18
    index: SuffixIndex = field(default_factory=SuffixIndex)
    _ids: itertools.count = field(default_factory=itertools.count)
    _sizes: OrderedDict[int, int] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _evicted: int = 0

    def add(self, tokens: list[int]) -> None:
        if not tokens:
            return
        tokens = tokens[-self.max_tokens :]
        with self._lock:
            seq_id = next(self._ids)
            self.index.extend(seq_id, tokens)
            self._sizes[seq_id] = len(tokens)
            while sum(self._sizes.values()) > self.max_tokens:
                old, _ = self._sizes.popitem(last=False)
                self.index.drop(old)
                self._evicted += 1
            if self._evicted > len(self._sizes) + 16:  # now and then: drop dead occurrences
                self.index.prune()
                self._evicted = 0

    @property
    def num_tokens(self) -> int:
        return sum(self._sizes.values())

    @property
    def num_outputs(self) -> int:
        return len(self._sizes)

    def continuations(
        self, context: list[int], min_n: int, depth: int
    ) -> tuple[int, list[list[int]]]:
        """As _continuations, over the stored outputs."""
        with self._lock:
            return _continuations(self.index, context, min_n, depth)


MATCH_BUCKETS = (1, 2, 3, 5, 9)  # match lengths from which a calibration bucket starts


def match_bucket(n: int) -> int:
    return sum(n >= s for s in MATCH_BUCKETS) - 1


class TenantStores:
    """One SuffixStore per tenant, for the most recent `max_tenants` tenants (the least
    recently used one's outputs go first): sessions draft from their own tenant's outputs
    only. max_tenants 0: none kept."""

    def __init__(self, max_tenants: int = 64, tokens_per_tenant: int = 1 << 16):
        self.max_tenants, self.tokens_per_tenant = max_tenants, tokens_per_tenant
        self._stores: OrderedDict[str, SuffixStore] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, tenant: str) -> SuffixStore | None:
        if self.max_tenants <= 0:
            return None
        with self._lock:
            store = self._stores.pop(tenant, None) or SuffixStore(self.tokens_per_tenant)
            self._stores[tenant] = store
            while len(self._stores) > self.max_tenants:
                self._stores.popitem(last=False)
            return store

    def tenants(self) -> list[str]:
        with self._lock:
            return list(self._stores)


class SuffixDrafter(Drafter):
    name = "suffix"
    prior_acceptance = 0.5
    sizes_itself = True

    def __init__(
        self,
        store: SuffixStore | None = None,
        tree_width: int = 1,
        max_match: int = MAX_MATCH,
        output_prefix: int = MAX_MATCH,
    ):
        """store: earlier outputs to draft from too; this drafter adds its request's output
        there when it finishes (as far as it saw it: all but the last round's tokens), with
        output_prefix prompt tokens before it so that the answer's start can be matched.
        tree_width: most children per draft node (1: chains)."""
        if tree_width < 1:
            raise ValueError(f"tree_width must be >= 1, got {tree_width}")
        self.store, self.tree_width = store, tree_width
        self.max_match, self.output_prefix = max_match, output_prefix
        self._index = SuffixIndex(max_match)
        self._prompt_len = 0
        self.prices: tuple[float, ...] = ()
        # kept across requests, as the store is
        self.calibration = NodeCalibration(len(MATCH_BUCKETS), decay=CALIBRATION_DECAY)

    def price_nodes(self, prices: tuple[float, ...]) -> None:
        self.prices = tuple(prices)

    def start(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self._index = SuffixIndex(self.max_match)
        self._prompt_len = len(prompt_ids)

    def forget(self) -> None:
        if self.store is not None:
            self.store = SuffixStore(self.store.max_tokens)
        self.calibration.forget()

    def read(self, context: list[int]) -> None:
        self._sync(context)

    def finish(self) -> None:
        seq = self._index.seqs.get(0, [])
        if self.store is not None and len(seq) > self._prompt_len:
            self.store.add(seq[max(0, self._prompt_len - self.output_prefix) :])
        self._index = SuffixIndex(self.max_match)

    def propose(self, context: list[int], k: int) -> Draft:
        self.calibration.verified(context)
        if k <= 0:
            return Draft([])
        self._sync(context)
        n, paths = _continuations(self._index, context, 1, k)
        if self.store is not None:
            m, more = self.store.continuations(context, max(n, 1), k)
            if m > n:  # a longer match there: it decides
                n, paths = m, more
            elif m == n:  # earlier outputs first: the request's own text is the newest
                paths = more + paths
        if not paths:
            return Draft([])
        depth = min(k, MATCH_FACTOR * n)
        bucket = match_bucket(n)
        rate = self.calibration.rate(bucket)
        draft = _grow(paths, depth, k * self.tree_width, self.tree_width, self.prices, rate)
        self.calibration.drafted(len(context), draft, [bucket] * len(draft))
        return draft

    def _sync(self, context: list[int]) -> None:
        """Index the context as sequence 0 (afresh if it is not an extension: PEARL)."""
        seq = self._index.seqs.get(0, [])
        if context[: len(seq)] != seq:
            self._index = SuffixIndex(self.max_match)
            seq = []
        self._index.extend(0, context[len(seq) :])


def _continuations(
    index: SuffixIndex, context: list[int], min_n: int, depth: int
) -> tuple[int, list[list[int]]]:
    """(the longest n >= min_n whose n-gram ending the context occurred before with tokens
    after it, those tokens up to depth for each such occurrence); (0, []) if none."""
    best_n, best = 0, []
    for n in range(1, min(index.max_match, len(context)) + 1):
        occ = index.occurrences(tuple(context[-n:]))
        if not occ:
            break
        # the context's own end is an occurrence with nothing after it
        followed = [(s, end) for s, end in occ if end < len(index.seqs[s])]
        if followed and n >= min_n:
            best_n, best = n, followed
    return best_n, [index.seqs[s][end : end + depth] for s, end in best]


def _grow(paths, depth: int, budget: int, width: int, prices, rate: float = 1.0) -> Draft:
    """A draft from candidate continuations counted into a trie: each next token's chance is
    rate times the share of the continuations through its parent that go on with it; nodes
    best first (tree.best_first), none below MIN_SHARE or below the node price."""
    count: dict[tuple[int, ...], float] = {}
    weights = [RECENCY ** (len(paths) - 1 - i) for i in range(len(paths))]  # newest: 1
    for path, w in zip(paths, weights, strict=True):
        for d in range(1, min(depth, len(path)) + 1):
            count[tuple(path[:d])] = count.get(tuple(path[:d]), 0.0) + w
    kids: dict[tuple[int, ...], list[tuple[int, float]]] = {}
    total = sum(weights)
    for prefix, n in count.items():
        parent = count.get(prefix[:-1], total)
        kids.setdefault(prefix[:-1], []).append((prefix[-1], rate * n / parent))
    for options in kids.values():
        options.sort(key=lambda o: -o[1])
    tokens, parents = best_first(
        lambda path: kids.get(tuple(path), []), budget, depth, prices, width, MIN_SHARE
    )
    return Draft(tokens, parents)
