"""sd or pearl: which pays on the placement at hand, measured once at start-up (mode auto).

PEARL drafts the next burst while the target verifies the last one. That saves time only where
the two really run at once: on cores or devices of their own. Where they share them (two torch
thread pools on the same cores) the overlap is contention, and PEARL still pays for its
pre-verify rounds (one token after each rejection). So time a burst of k draft tokens and a
k-row target forward alone and at the same time (two threads, as PearlDecoder runs them), and
choose PEARL when running them together takes at most 1 - PEARL_MIN_SAVING of running them one
after the other.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from distspec.models.llama import Transformer
from distspec.models.openmp import call_then_release
from distspec.spec_decode.draft_policy import dummy_context, target_forward, timed
from distspec.spec_decode.drafter import Drafter
from distspec.spec_decode.sampling import SamplingParams

# PEARL's own losses, relative to SD's round: about one pre-verify round (a target step for
# one token) per rejection; at 95% acceptance and 8-token bursts, one round in two or three
PEARL_MIN_SAVING = 0.2


@dataclass(frozen=True)
class OverlapTiming:
    draft_s: float  # a burst of k draft tokens, alone
    verify_s: float  # a k-row target forward, alone
    together_s: float  # both at once

    @property
    def saving(self) -> float:
        """The share of the sequential time that running both at once saves."""
        return 1 - self.together_s / (self.draft_s + self.verify_s)

    def __str__(self) -> str:
        return (
            f"draft {self.draft_s * 1e3:.1f} ms, verify {self.verify_s * 1e3:.1f} ms, "
            f"together {self.together_s * 1e3:.1f} ms (saves {self.saving:.0%})"
        )


def choose_mode(timing: OverlapTiming | None) -> str:
    """ "pearl" where the overlap saves enough, else "sd" (also when nothing was measured)."""
    if timing is not None and timing.saving >= PEARL_MIN_SAVING:
        return "pearl"
    return "sd"


def measure_overlap(
    target: Transformer, drafter: Drafter, k: int, context_len: int = 64, repeats: int = 3
) -> OverlapTiming | None:
    """Time k drafted tokens and a k-row target forward, alone and at once (medians); None
    when the context is too short to try. Uses cache slot 0 of both models at positions the
    next request overwrites anyway."""
    context_len = min(context_len, target.max_len - 2 * (k + 1))
    if context_len < 1:
        return None
    context = dummy_context(target.config.vocab_size, context_len)
    verify = target_forward(target, context, k)
    drafter.start(context, SamplingParams())
    drafter.propose(context, k)  # fills the drafter's cache with the context

    def draft() -> None:
        drafter.propose(context, k)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="overlap-probe") as pool:

        def together() -> None:
            drafting = pool.submit(call_then_release, draft)
            verify()
            drafting.result()

        timing = OverlapTiming(
            timed(draft, repeats), timed(verify, repeats), timed(together, repeats)
        )
    drafter.finish()
    return timing
