"""Which kind of round to run, round by round, from measured throughput.

Speculation pays less as the batch grows: verification turns compute-bound and drafting
grows with the sessions; PEARL pays only where drafting and verifying really run at once.
Per batch size (exact up to 4, then by powers of two), the switch keeps the tokens/s of each
kind of round it may run ("plain", and "sd" and/or "pearl": running averages), takes the
best one, and tries the others in turn every `probe_every` rounds so a change shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distspec.spec_decode.draft_policy import ema

PLAIN = "plain"


def _bucket(batch: int) -> int:
    return batch if batch <= 4 else 1 << (batch - 1).bit_length()


@dataclass
class SpeculationSwitch:
    probe_every: int = 16
    decay: float = 0.8
    _rates: dict[tuple[int, str], float] = field(default_factory=dict)
    _rounds: dict[int, int] = field(default_factory=dict)

    def choose(self, batch: int, kinds: tuple[str, ...]) -> str:
        """The kind of this round, of kinds (speculative ones first, then PLAIN); a kind not
        measured yet at this batch size is tried first."""
        b = _bucket(batch)
        n = self._rounds[b] = self._rounds.get(b, 0) + 1
        untried = [k for k in kinds if (b, k) not in self._rates]
        if untried:
            return untried[0]
        ranked = sorted(kinds, key=lambda k: -self._rates[(b, k)])
        if n % self.probe_every == 0 and len(ranked) > 1:  # the others, in turn
            return ranked[1 + (n // self.probe_every) % (len(ranked) - 1)]
        return ranked[0]

    def observe(self, batch: int, kind: str, tokens: int, seconds: float) -> None:
        """A round of `kind` at this batch size made `tokens` in `seconds`."""
        if seconds > 0:
            key = (_bucket(batch), kind)
            self._rates[key] = ema(self._rates.get(key), tokens / seconds, self.decay)
