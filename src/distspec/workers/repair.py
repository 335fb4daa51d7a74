"""What the scheduler needs from whoever can repair its workers (cluster/recovery.py on Ray).

The scheduler decides what happens to sessions; the repairer only replaces workers. After a
repair the scheduler resumes every session from its verified tokens and each goes on as if
nothing happened: a sampled token is a function of the session's seed and its position
(spec_decode/sampling.py), not of the workers that draw it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from distspec.workers.remote import Remote


@dataclass
class Repair:
    target: Remote | None = None  # a rebuilt target (an empty KV cache), None if it was fine
    drafters: dict[int, Remote] = field(default_factory=dict)  # index -> stand-in or rebuilt


class Repairer(Protocol):
    def broken(self) -> bool:
        """Cheap check, run every second while the scheduler is idle: has a worker visibly
        died? (During rounds a dead worker fails the round's calls.)"""

    def repair(self) -> Repair | None:
        """Replace every broken worker; None when none is broken (the failure was not a
        worker's). Blocks while a target is rebuilt."""

    def rebuilt_drafters(self) -> dict[int, Remote]:
        """Drafters rebuilt since the last call, to take back from their stand-ins."""
