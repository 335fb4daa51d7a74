"""Handing torch's CPU compute from one thread to another without OpenMP's slow path.

Every thread that runs a parallel region gets its own OpenMP thread pool, and the pool's
threads stay. GNU OpenMP (what the PyTorch wheels ship) counts all of them, and once they
outnumber the cores, its threads stop spin-waiting between regions and sleep instead: each
later region then starts with a futex wake-up of every worker. On this 2-core VM that took a
576 x 576 matmul from 14 to 89 us, and a decode step of the demo target from 20 to 30 ms,
in any thread, after the main thread had loaded the model and handed it to a scheduler
thread. `release_openmp_pool()`, called by the thread that hands its compute on, frees that
thread's pool (OpenMP 5's omp_pause_resource_all), so only the compute thread's stays.
`call_then_release` does so after a call on a helper thread (a local worker's, PEARL's drafter,
an edge client's drafter): making the pool again costs one thread start per call.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

OMP_PAUSE_SOFT = 1
_RUNTIMES = ("libgomp", "libiomp", "libomp")


@functools.cache
def _runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded into this process (None where there is none or the
    platform has no /proc)."""
    import torch  # noqa: F401  (loads the runtime)

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        name = path.rsplit("/", 1)[-1]
        if name.startswith(_RUNTIMES) and ".so" in name:
            lib = ctypes.CDLL(path)
            if hasattr(lib, "omp_pause_resource_all"):
                return lib
    return None


def release_openmp_pool() -> bool:
    """Free the calling thread's OpenMP pool (it is made again if the thread computes again).
    True where the runtime did."""
    lib = _runtime()
    if lib is None:
        return False
    ok = lib.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0
    if not ok:
        log.debug("OpenMP runtime %s did not release its pool", lib._name)
    return ok


def call_then_release(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args), then the calling thread's pool freed (for work submitted to a helper thread,
    so that threads computing in turn never hold more pool threads than there are cores)."""
    try:
        return fn(*args)
    finally:
        release_openmp_pool()
