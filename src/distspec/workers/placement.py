"""Separate compute on one machine: the target's thread and the drafter's on cores of their own.

Pinning is per thread (Linux `sched_setaffinity` of the calling thread) and so is the torch
thread count (OpenMP's per-thread setting), so the target in the caller's thread and a
drafter on a thread of its own each compute on their own cores without stealing the other's
(the CPU kernels release the GIL while they compute). Measured on this 2-core machine
(docs/serving.md): a 3-row demo target forward on core 0 takes 53 ms and 2 tokens of its int4
copy on core 1 21 ms, alone or at the same time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from distspec.models.openmp import call_then_release
from distspec.spec_decode.drafter import Draft, Drafter
from distspec.spec_decode.sampling import SamplingParams


@dataclass(frozen=True)
class CpuPlacement:
    target: tuple[int, ...]
    drafter: tuple[int, ...]

    def __str__(self) -> str:
        return f"target on cores {_cores(self.target)}, drafter on cores {_cores(self.drafter)}"

    @contextmanager
    def on_target(self) -> Iterator[None]:
        """Run the calling thread on the target's cores (with as many torch threads) inside."""
        before = current_placement()
        pin_this_thread(self.target)
        try:
            yield
        finally:
            pin_this_thread(*before)


def split_cpus(drafter_cpus: int, cpus: list[int] | None = None) -> CpuPlacement:
    """The last `drafter_cpus` of the cores this process may use for the drafter, the rest for
    the target."""
    cpus = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    if not 0 < drafter_cpus < len(cpus):
        raise ValueError(
            f"drafter cpus must be between 1 and {len(cpus) - 1} (this process may use "
            f"{len(cpus)} cores), got {drafter_cpus}"
        )
    return CpuPlacement(tuple(cpus[:-drafter_cpus]), tuple(cpus[-drafter_cpus:]))


def pin_this_thread(cpus: tuple[int, ...], threads: int | None = None) -> None:
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(threads or len(cpus))


def pin_this_process(cpus: tuple[int, ...], threads: int | None = None) -> None:
    """Every thread of this process (threads started later inherit it) on cpus, and the
    calling thread's torch threads to match (a worker process: its calls run there)."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
            os.sched_setaffinity(int(tid), cpus)
    torch.set_num_threads(threads or len(cpus))


def apply_placement(cpus: tuple[int, ...], threads: int | None) -> None:
    """A worker's start: pinned to cpus when given, torch threads as given (else as many as
    cpus; neither: torch's default)."""
    if cpus:
        pin_this_process(tuple(cpus), threads)
    elif threads:
        torch.set_num_threads(threads)


def current_placement() -> tuple[tuple[int, ...], int]:
    """(cores, torch threads) of the calling thread: what a test reads back."""
    return tuple(sorted(os.sched_getaffinity(0))), torch.get_num_threads()


class PinnedDrafter(Drafter):
    """A drafter whose every call runs on a thread of its own, pinned to `cpus`: the target's
    thread (SD) or PEARL's drafting thread hands it the work and waits."""

    name = "pinned"

    def __init__(self, inner: Drafter, cpus: tuple[int, ...]):
        self.inner = inner
        self.prior_acceptance = inner.prior_acceptance
        self.sizes_itself = inner.sizes_itself
        self._thread = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="distspec-drafter",
            initializer=pin_this_thread,
            initargs=(cpus,),
        )

    def _compute(self, fn, *args):
        """fn(*args) on the drafter's thread, whose OpenMP pool is freed after it (see
        models/openmp.py)."""
        return self._thread.submit(call_then_release, fn, *args).result()

    def start(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self._compute(self.inner.start, prompt_ids, params)

    def propose(self, context: list[int], k: int) -> Draft:
        return self._compute(self.inner.propose, context, k)

    def finish(self) -> None:
        self._compute(self.inner.finish)

    def stop_reading_target_kv(self) -> None:
        self.inner.stop_reading_target_kv()

    def observe(self, chunk: list[int], logits) -> None:
        self.inner.observe(chunk, logits)  # bookkeeping, cheap: on the caller's thread

    def forget(self) -> None:
        self.inner.forget()

    def price_nodes(self, prices: tuple[float, ...]) -> None:
        self.inner.price_nodes(prices)

    def placement(self) -> tuple[tuple[int, ...], int]:
        """(cores, torch threads) of the drafter's thread, read back from it."""
        return self._thread.submit(current_placement).result()

    def close(self) -> None:
        self._thread.shutdown(wait=True)


def _cores(cpus: tuple[int, ...]) -> str:
    return ",".join(map(str, cpus))
