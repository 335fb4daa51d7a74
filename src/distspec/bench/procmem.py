"""Resident memory of a process tree (a server and every process it started: Ray's GCS,
raylet, workers...), sampled at a fixed interval in a background thread."""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from dataclasses import dataclass

import psutil

MB = 1e6


@dataclass
class RssSample:
    t: float  # time.monotonic()
    rss: dict[int, int]  # pid -> bytes


@dataclass
class ProcessMemory:
    pid: int
    label: str
    start_mb: float  # first sample
    end_mb: float  # last sample
    max_mb: float
    samples: int
    growth_mb: float | None  # as RssGrowth, over the window processes() was given


@dataclass
class RssGrowth:
    """Median total RSS of the last third of a window minus that of its first third."""

    baseline_mb: float
    growth_mb: float
    samples: int


class ProcessTreeSampler:
    def __init__(self, root_pid: int, interval_s: float = 1.0):
        self.root_pid = root_pid
        self.interval_s = interval_s
        self.samples: list[RssSample] = []
        self.labels: dict[int, str] = {}
        self._root: psutil.Process | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> ProcessTreeSampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> RssSample | None:
        """One reading of every live process of the tree (None once the root is gone)."""
        try:
            if self._root is None:
                self._root = psutil.Process(self.root_pid)
            tree = [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            return None
        rss: dict[int, int] = {}
        for p in tree:
            with contextlib.suppress(psutil.Error):  # it exited meanwhile
                rss[p.pid] = p.memory_info().rss
                self.labels[p.pid] = _label(p)
        sample = RssSample(time.monotonic(), rss)
        self.samples.append(sample)
        return sample

    def processes(self, t0: float = float("-inf"), t1: float = float("inf")) -> list[ProcessMemory]:
        """Every process seen, largest last reading first; growth over [t0, t1]."""
        seen: dict[int, list[int]] = {}
        for s in self.samples:
            for pid, rss in s.rss.items():
                seen.setdefault(pid, []).append(rss)
        rows = []
        for pid, v in seen.items():
            window = [s.rss[pid] / MB for s in self.window(t0, t1) if pid in s.rss]
            growth = _growth(window)
            rows.append(
                ProcessMemory(
                    pid,
                    self.labels.get(pid, "?"),
                    v[0] / MB,
                    v[-1] / MB,
                    max(v) / MB,
                    len(v),
                    growth.growth_mb if growth else None,
                )
            )
        return sorted(rows, key=lambda r: -r.end_mb)

    def window(self, t0: float = float("-inf"), t1: float = float("inf")) -> list[RssSample]:
        return [s for s in self.samples if t0 <= s.t <= t1]

    def growth(self, t0: float, t1: float) -> RssGrowth | None:
        """Growth of the total over [t0, t1]; None with fewer than 3 samples there."""
        return _growth([sum(s.rss.values()) / MB for s in self.window(t0, t1)])


def _growth(values_mb: list[float]) -> RssGrowth | None:
    third = len(values_mb) // 3
    if third < 1:
        return None
    first = statistics.median(values_mb[:third])
    last = statistics.median(values_mb[-third:])
    return RssGrowth(first, last - first, len(values_mb))


def _label(p: psutil.Process) -> str:
    """A short name: Ray's process title (ray::TargetWorker), a script, or the executable."""
    try:
        cmdline = p.cmdline()
    except psutil.Error:
        cmdline = []
    if cmdline and cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0].split(".")[0]  # drop the method a worker is running
    for i, arg in enumerate(cmdline[1:], start=1):
        if arg == "-m" and i + 1 < len(cmdline):
            return " ".join(cmdline[i + 1 : i + 3])  # e.g. "distspec serve"
        if arg.endswith(".py"):
            return os.path.basename(arg)
        if not arg.startswith("-"):
            break
    try:
        return p.name()
    except psutil.Error:
        return "?"
