"""How many tokens to draft next round.

Start from PEARL's rule (gamma ~ t_target / t_draft) and keep choosing the k that maximises
expected tokens per second under the standard model: each draft token is accepted with
probability alpha (estimated online from verdicts), a round of k drafts yields
(1 - alpha^(k+1)) / (1 - alpha) tokens and costs k * t_draft + t_verify(k), with
t_verify(k) = t_step * (1 + beta * k) measured from the target's own forwards. When no k beats
plain decoding, speculation switches off (k = 0) and is probed again every `probe_every`
rounds, so a drafter that starts to fit the text comes back.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DraftLengthPolicy:
    max_k: int = 8
    fixed: bool = False  # True: always max_k (no adaptation)
    alpha: float = 0.6  # prior per-token acceptance
    decay: float = 0.9  # weight of the past in running estimates
    probe_every: int = 8
    min_gain: float = 1.03  # speculation must beat plain decoding by this factor

    def __post_init__(self) -> None:
        self._t_draft: float | None = None  # seconds per drafted token
        self._t_step: float | None = None  # one-token target forward
        self._beta = 0.08  # extra verify cost per draft token, relative to t_step
        self._off_rounds = 0

    def next_k(self) -> int:
        if self.fixed:
            return self.max_k
        if self._t_step is None:
            return 0  # one plain step first: its time is the yardstick
        if self._t_draft is None:
            return self.max_k
        k = self.best_k()
        if k == 0:
            self._off_rounds += 1
            if self._off_rounds >= self.probe_every:
                self._off_rounds = 0
                return 1
        return k

    def best_k(self) -> int:
        a, td, ts = min(self.alpha, 0.999), self._t_draft, self._t_step
        best_k, best_rate = 0, 1.0 / ts
        for k in range(1, self.max_k + 1):
            tokens = (1 - a ** (k + 1)) / (1 - a)
            rate = tokens / (k * td + ts * (1 + self._beta * k))
            if rate > best_rate * (self.min_gain if best_k == 0 else 1.0):
                best_k, best_rate = k, rate
        return best_k

    def observe_round(self, k: int, accepted: int, draft_s: float, verify_s: float) -> None:
        """Feed one round's outcome: k drafted, accepted of them, and its timings."""
        d = self.decay
        if k == 0:
            self._t_step = _ema(self._t_step, verify_s, d)
        else:
            # geometric model: accepted successes, then one failure unless all were accepted
            trials = accepted + (1 if accepted < k else 0)
            if trials:
                self.alpha = d * self.alpha + (1 - d) * (accepted / trials)
            self._t_draft = _ema(self._t_draft, draft_s / k, d)
            if self._t_step is not None:
                beta = (verify_s / self._t_step - 1) / k
                self._beta = d * self._beta + (1 - d) * min(max(beta, 0.0), 1.0)


def _ema(old: float | None, new: float, decay: float) -> float:
    return new if old is None else decay * old + (1 - decay) * new
