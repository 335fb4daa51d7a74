"""How many tokens to draft next round.

Start from PEARL's rule (gamma ~ t_target / t_draft) and keep choosing the k that maximises
expected tokens per second under the standard model: each draft token is accepted with
probability alpha (estimated online from verdicts), a round of k drafts yields
(1 - alpha^(k+1)) / (1 - alpha) tokens and costs k * t_draft + t_verify(k + 1 rows).
t_verify comes from the calibration's table of chunk sizes where there is one: it is far from
linear on a CPU, where a chunk of up to 6 rows reads each weight once (1.0-1.3x a step) and
longer ones start another pass (13 rows: 2.8x), so a line through one point picks drafts too
short on one side of it or too long on the other. Without a table, t_step * (1 + beta * k).
When no k beats plain decoding, speculation switches
off (k = 0) and is probed again every `probe_every` rounds, so a drafter that starts to fit
the text comes back.

Costs come from a calibration (`measure_costs`, run once when an engine starts): decisions
then depend only on the verdicts, so a seeded request reproduces exactly. Without one, the
policy times the rounds themselves.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from distspec.models.llama import Transformer
from distspec.spec_decode.drafter import Drafter
from distspec.spec_decode.sampling import SamplingParams


@dataclass(frozen=True)
class DraftCosts:
    t_step: float  # seconds for a one-token target forward
    t_draft: float  # seconds per drafted token
    beta: float  # extra verify cost per draft token, relative to t_step
    # measured target forwards: (rows, seconds), rows ascending (see time_target)
    verify: tuple[tuple[int, float], ...] = ()
    prior_alpha: float = Drafter.prior_acceptance  # the drafter's own guess of its acceptance
    # measured drafting steps for several sessions at once: (sessions, seconds), ascending
    # (a batched step reads the drafter's weights once: drafters/batched.py)
    draft_batch: tuple[tuple[int, float], ...] = ()

    def t_verify(self, rows: int) -> float:
        """Seconds for a target forward of `rows` rows: the table's, linearly interpolated
        (extrapolated past its last point along its last segment); else the beta line."""
        if len(self.verify) < 2:
            return self.t_step * (1 + self.beta * (rows - 1))
        return _interpolate(self.verify, rows)

    def t_draft_at(self, sessions: int) -> float:
        """Seconds of one drafting step for `sessions` sessions at once (t_draft for one)."""
        if sessions <= 1 or len(self.draft_batch) < 2:
            return self.t_draft
        return self.t_draft * _interpolate(self.draft_batch, sessions) / self.draft_batch[0][1]


@functools.lru_cache(maxsize=64)
def _node_row_seconds(verify: tuple[tuple[int, float], ...], batch: int, nodes: int):
    """Seconds each of a draft's first `nodes` nodes adds per session when `batch` sessions
    are verified together, on the verify table's lower convex hull (the same for every round
    of a calibration: cached)."""
    hull = _lower_hull(verify)
    rows = [_interpolate(hull, batch * (i + 1)) for i in range(nodes + 1)]
    return tuple(max(rows[i + 1] - rows[i], 0.0) / batch for i in range(nodes))


def _lower_hull(points: tuple[tuple[int, float], ...]) -> tuple[tuple[int, float], ...]:
    """The lower convex hull of (x, y) points, x ascending: its slopes only grow."""
    hull: list[tuple[int, float]] = []
    for p in points:
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (y1 - y0) * (p[0] - x0) >= (p[1] - y0) * (x1 - x0):  # hull[-1] on or above
                hull.pop()
            else:
                break
        hull.append(p)
    return tuple(hull)


def _interpolate(points: tuple[tuple[int, float], ...], x: int) -> float:
    """Linear through (x, y) points (ascending x), extrapolated along the last segment."""
    i = next((i for i in range(1, len(points)) if x <= points[i][0]), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass
class DraftLengthPolicy:
    max_k: int = 8
    fixed: bool = False  # True: always max_k (no adaptation)
    alpha: float | None = None  # prior per-token acceptance; None: the costs' (else 0.6)
    # weight of the past in running estimates; 0.95: about 20 draft tokens (at 0.9 one
    # rejection cut a 0.97-acceptance drafter back to 2-token drafts for several rounds)
    decay: float = 0.95
    probe_every: int = 8
    min_gain: float = 1.03  # speculation must beat plain decoding by this factor
    costs: DraftCosts | None = None

    def __post_init__(self) -> None:
        c = self.costs
        if self.alpha is None:
            self.alpha = c.prior_alpha if c else DraftCosts.prior_alpha
        self._t_step = c.t_step if c else None
        self._t_draft = c.t_draft if c else None
        self._beta = c.beta if c else 0.08
        self._off_rounds = 0

    def next_k(self, batch: int = 1) -> int:
        """The draft length for this round, with `batch` sessions verified together."""
        if self.fixed:
            return self.max_k
        if self._t_step is None:
            return 0  # one plain step first: its time is the yardstick
        if self._t_draft is None:
            return self.max_k
        k = self.best_k(batch)
        # alone, a drafter that starts to fit the text gets probed again; in a batch one
        # session's probe would make the whole round wait for a drafting call (16 sessions
        # probing in turn: nearly every round), and the speculation switch probes anyway
        if k == 0 and batch == 1:
            self._off_rounds += 1
            if self._off_rounds >= self.probe_every:
                self._off_rounds = 0
                return 1
        return k

    def best_k(self, batch: int = 1) -> int:
        """The k of the best expected tokens/s when `batch` sessions each draft k and are
        verified in one forward of batch * (k + 1) rows (on a CPU that turns compute-bound
        within a few sessions: long drafts then stop paying)."""
        a = min(self.alpha, 0.999)
        c = self.costs
        if c is not None and c.verify:
            t_verify, td = c.t_verify, c.t_draft_at(batch)
        else:
            ts, beta = self._t_step, self._beta
            t_verify, td = (lambda rows: ts * (1 + beta * (rows - 1))), self._t_draft
        best_k, best_rate = 0, batch / t_verify(batch)
        for k in range(1, self.max_k + 1):
            tokens = (1 - a ** (k + 1)) / (1 - a)
            rate = batch * tokens / (k * td + t_verify(batch * (k + 1)))
            if rate > best_rate * (self.min_gain if best_k == 0 else 1.0):
                best_k, best_rate = k, rate
        return best_k

    def node_prices(self, k: int, batch: int = 1, nodes: int = 64) -> tuple[float, ...]:
        """prices[i]: the least chance of being accepted that pays for a draft's (i+1)-th
        node: the verify row it adds for each of `batch` sessions (the measured table's lower
        convex hull, so prices never fall as a draft grows) over what one output token costs
        in rounds of k-token drafts for the batch (the round's time over the tokens all its
        sessions gain). () without measured costs: trees fill their budget."""
        c = self.costs
        if c is None or len(c.verify) < 2:
            return ()
        a = min(self.alpha, 0.999)
        tokens = (1 - a ** (k + 1)) / (1 - a)
        t_token = (k * c.t_draft_at(batch) + c.t_verify(batch * (k + 1))) / (batch * tokens)
        return tuple(s / t_token for s in _node_row_seconds(c.verify, batch, nodes))

    def observe_round(self, k: int, accepted: int, draft_s: float, verify_s: float) -> None:
        """Feed one round's outcome: k drafted, accepted of them, and its timings."""
        d = self.decay
        if k > 0:
            # geometric model: accepted successes, then one failure unless all were accepted;
            # each trial weighs the same, so a long accepted draft moves alpha as far as
            # that many short ones (a drafter that agrees 97% of the time reaches long
            # drafts within a few rounds, not a few dozen)
            trials = accepted + (1 if accepted < k else 0)
            if trials:
                w = d**trials
                self.alpha = w * self.alpha + (1 - w) * (accepted / trials)
        if self.costs is not None:
            return
        if k == 0:
            self._t_step = ema(self._t_step, verify_s, d)
        else:
            self._t_draft = ema(self._t_draft, draft_s / k, d)
            if self._t_step is not None:
                beta = (verify_s / self._t_step - 1) / k
                self._beta = d * self._beta + (1 - d) * min(max(beta, 0.0), 1.0)


def ema(old: float | None, new: float, decay: float = 0.8) -> float:
    """Exponential moving average; the first value starts it."""
    return new if old is None else decay * old + (1 - decay) * new


def measure_costs(
    target: Transformer, drafter: Drafter, k: int, context_len: int = 64, repeats: int = 5
) -> DraftCosts | None:
    """Time the target's one-token and (k+1)-token forwards and k draft steps (medians);
    None when the context is too short to try (the policy then times live rounds).

    Uses cache slot 0 of both models at positions the next request overwrites anyway."""
    timing = time_target(target, k, context_len, repeats)
    if timing is None:
        return None
    t_draft = time_drafter(drafter, target.config.vocab_size, k, context_len, repeats)
    return costs_from(timing, t_draft, drafter.prior_acceptance)


# chunk sizes the calibration times (up to the longest draft + 1); others are interpolated
# (and, for a server, up to its sessions' chunks together)
VERIFY_ROWS = (1, 2, 3, 5, 7, 9, 13, 17, 25, 33, 65, 129)


def time_target(
    target: Transformer, k: int, context_len: int = 64, repeats: int = 5, max_rows: int = 0
) -> tuple[tuple[int, float], ...] | None:
    """Target forwards of 1 to k + 1 rows, timed: ((rows, seconds), ...) for the sizes of
    VERIFY_ROWS up to k + 1 (or max_rows, a batch's chunks, where they fit in the cache),
    and k + 1 itself."""
    context_len = min(context_len, target.max_len - 2 * (k + 1))
    if context_len < 1:
        return None
    context = dummy_context(target.config.vocab_size, context_len)
    run = target_forward(target, context, 1)  # also reads the context into slot 0
    upto = max(k + 1, min(max_rows, target.max_len - context_len))
    sizes = sorted({n for n in VERIFY_ROWS if n <= upto} | {k + 1})
    runs = [run] + [target_forward(target, context, n, prefill=False) for n in sizes[1:]]
    return tuple(zip(sizes, timed_together(runs, repeats), strict=True))


def target_forward(target: Transformer, context: list[int], rows: int, prefill: bool = True):
    """A callable that runs a `rows`-row target forward after context (read into cache slot
    0 first, unless prefill is False)."""
    if prefill:
        target(torch.tensor([context]), torch.arange(len(context))[None], torch.tensor([0]))
    pos = torch.arange(len(context) - 1, len(context) - 1 + rows)[None]
    tokens = torch.tensor([context[-1:] * rows])
    return lambda: target(tokens, pos, torch.tensor([0]))


def costs_from(
    verify: tuple[tuple[int, float], ...],
    t_draft: float,
    prior_alpha: float = Drafter.prior_acceptance,
) -> DraftCosts:
    """DraftCosts from time_target's table, a drafter's seconds per token and its prior."""
    t_step = verify[0][1]
    rows, t_last = verify[-1]
    beta = max(0.0, (t_last / t_step - 1) / (rows - 1)) if rows > 1 else 0.0
    return DraftCosts(t_step, t_draft, beta, verify, prior_alpha)


def time_drafter(
    drafter: Drafter, vocab_size: int, k: int, context_len: int = 64, repeats: int = 5
) -> float:
    """Seconds per drafted token, drafting k after a context with nothing to look up."""
    context = dummy_context(vocab_size, context_len)
    drafter.start(context, SamplingParams())
    drafter.propose(context, k)  # fills the drafter's cache with the context
    t_draft = timed(lambda: drafter.propose(context, k), repeats) / k
    drafter.finish()
    return t_draft


def dummy_context(vocab_size: int, n: int) -> list[int]:
    return [t % vocab_size for t in range(100, 100 + n)]


def timed(fn, repeats: int) -> float:
    return timed_together([fn], repeats)[0]


def timed_together(fns, repeats: int) -> list[float]:
    """Median seconds of each callable, called in turn `repeats` times after a warm-up round:
    a slow spell of a shared machine then falls on every size alike instead of on one (the
    verify table's shape is what picks the draft length)."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats + 1):
        for fn, ts in zip(fns, times, strict=True):
            t = time.perf_counter()
            fn()
            if r:
                ts.append(time.perf_counter() - t)
    return [sorted(ts)[len(ts) // 2] for ts in times]
