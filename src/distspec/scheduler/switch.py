"""Which kind of round to run, round by round, from measured throughput.

Speculation pays less as the batch grows: verification turns compute-bound and drafting
grows with the sessions; PEARL pays only where drafting and verifying really run at once.
Per batch size (exact up to 4, then by powers of two), the switch keeps the tokens/s of each
kind of round it may run ("plain", and "sd" and/or "pearl": running averages), takes the
best one, and tries the others in turn every `probe_every` rounds so a change shows.

A PEARL try is a run of `pearl_rounds` rounds, measured as one: PEARL starts with nothing
pending, so its first round verifies a single drafted token and the rest of that draft is
verified, and credited, in the rounds after (measured on Ray at one client: tried one round at
a time, PEARL never beat multi-step plain rounds).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distspec.spec_decode.draft_policy import ema

PLAIN = "plain"


def _bucket(batch: int) -> int:
    return batch if batch <= 4 else 1 << (batch - 1).bit_length()


@dataclass
class _Run:
    kind: str
    left: int
    tokens: int = 0
    seconds: float = 0.0


@dataclass
class SpeculationSwitch:
    probe_every: int = 16
    decay: float = 0.8
    pearl_rounds: int = 4
    _rates: dict[tuple[int, str], float] = field(default_factory=dict)
    _rounds: dict[int, int] = field(default_factory=dict)
    _runs: dict[int, _Run] = field(default_factory=dict)  # a PEARL try under way, per bucket

    def choose(self, batch: int, kinds: tuple[str, ...]) -> str:
        """The kind of this round, of kinds (speculative ones first, then PLAIN); a kind not
        measured yet at this batch size is tried first."""
        b = _bucket(batch)
        n = self._rounds[b] = self._rounds.get(b, 0) + 1
        run = self._runs.get(b)
        if run is not None and run.kind in kinds:
            return run.kind
        untried = [k for k in kinds if (b, k) not in self._rates]
        if untried:
            return self._try(b, untried[0])
        ranked = sorted(kinds, key=lambda k: -self._rates[(b, k)])
        if n % self.probe_every == 0 and len(ranked) > 1:  # the others, in turn
            return self._try(b, ranked[1 + (n // self.probe_every) % (len(ranked) - 1)])
        return ranked[0]

    def observe(self, batch: int, kind: str, tokens: int, seconds: float) -> None:
        """A round of `kind` at this batch size made `tokens` in `seconds`."""
        b = _bucket(batch)
        run = self._runs.get(b)
        if run is not None and run.kind == kind:
            run.tokens += tokens
            run.seconds += seconds
            run.left -= 1
            if run.left > 0:
                return
            del self._runs[b]
            tokens, seconds = run.tokens, run.seconds
        if seconds > 0:
            key = (b, kind)
            self._rates[key] = ema(self._rates.get(key), tokens / seconds, self.decay)

    def _try(self, bucket: int, kind: str) -> str:
        if kind == "pearl" and self.pearl_rounds > 1:
            self._runs[bucket] = _Run(kind, self.pearl_rounds)
        return kind
