"""The server's admission gauges, read from its Prometheus endpoint while a load runs."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from dataclasses import dataclass, field

GAUGES = {
    "queue": "distspec:queue_depth",
    "active": "distspec:active_sessions",
    "busy": "distspec:target_busy_fraction",
}


@dataclass
class Scrape:
    t: float  # time.monotonic()
    queue: float
    active: float
    busy: float


def scrape(address: str, timeout_s: float = 5.0) -> Scrape:
    """One reading of http://address/metrics. Raises OSError or ValueError."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s) as r:
        text = r.read().decode()
    values = {}
    for key, name in GAUGES.items():
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        if not match:
            raise ValueError(f"{name} is not exported at {address}")
        values[key] = float(match.group(1))
    return Scrape(time.monotonic(), **values)


@dataclass
class GaugePoller:
    """Scrapes every interval_s in a background thread until stop()."""

    address: str
    interval_s: float = 0.25
    scrapes: list[Scrape] = field(default_factory=list)
    failures: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-poller", daemon=True)

    def start(self) -> GaugePoller:
        self._thread.start()
        return self

    def stop(self) -> list[Scrape]:
        self._stop.set()
        self._thread.join()
        return self.scrapes

    def _run(self) -> None:
        while True:
            try:
                self.scrapes.append(scrape(self.address))
            except (OSError, ValueError):
                self.failures += 1
            if self._stop.wait(self.interval_s):
                return
