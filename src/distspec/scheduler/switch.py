"""Speculate or decode plainly, round by round, from measured throughput.

Speculation pays less as the batch grows: verification turns compute-bound and drafters
serve their sessions one after another. Per batch size (exact up to 4, then by powers of
two), the switch keeps the tokens/s of speculating and of plain rounds (running averages),
takes the better one, and tries the other every `probe_every` rounds so a change shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distspec.spec_decode.draft_policy import ema


def _bucket(batch: int) -> int:
    return batch if batch <= 4 else 1 << (batch - 1).bit_length()


@dataclass
class SpeculationSwitch:
    probe_every: int = 16
    decay: float = 0.8
    _rates: dict[tuple[int, bool], float] = field(default_factory=dict)
    _rounds: dict[int, int] = field(default_factory=dict)

    def plain(self, batch: int) -> bool:
        """True: this round decodes plainly."""
        b = _bucket(batch)
        n = self._rounds[b] = self._rounds.get(b, 0) + 1
        spec, plain = self._rates.get((b, False)), self._rates.get((b, True))
        if spec is None:
            return False
        if plain is None:
            return True
        better_plain = plain > spec
        return not better_plain if n % self.probe_every == 0 else better_plain

    def observe(self, batch: int, plain: bool, tokens: int, seconds: float) -> None:
        if seconds <= 0:
            return
        key = (_bucket(batch), plain)
        self._rates[key] = ema(self._rates.get(key), tokens / seconds, self.decay)
