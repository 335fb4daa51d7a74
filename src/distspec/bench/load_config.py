"""bench-load's settings (apart from the load generator, so the CLI parser stays light)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoadConfig:
    clients: list[int] = field(default_factory=lambda: [4, 16, 32])
    duration_s: float = 60.0  # per level
    max_new_tokens: int = 64
    temperature: float = 0.0
    warmup_s: float | None = None  # left out of the RSS growth; None: min(10, duration / 5)
    # a running server (HOST:PORT); None: start `distspec serve` with the settings below
    server: str | None = None
    metrics: str | None = None  # with server: its Prometheus endpoint (HOST:PORT)
    server_pid: int | None = None  # with server: a local server whose process tree to measure
    # the server's settings (with server: what it runs with, for the admission check)
    target: str = "demo"
    drafter: str = "demo"  # or none
    mode: str | None = None  # default: auto with a drafter, ar without
    num_slots: int = 16
    max_waiting: int = 16
    max_len: int = 1024
    use_ray: bool = True
    start_timeout_s: float = 600.0
    rss_interval_s: float = 1.0
    scrape_interval_s: float = 0.25
    leak_limit_mb: float = 50.0
    out_dir: str = "bench-results"

    def __post_init__(self) -> None:
        if not self.clients or any(n < 1 for n in self.clients):
            raise ValueError(f"clients must be >= 1, got {self.clients}")
        if not self.duration_s > 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.warmup_s is None:
            self.warmup_s = min(10.0, self.duration_s / 5)
        if not 0 <= self.warmup_s < self.duration_s:
            raise ValueError(f"warmup_s must be in [0, duration_s), got {self.warmup_s}")
        if self.server is not None:
            _check_address(self.server, "server")
        elif self.metrics is not None or self.server_pid is not None:
            raise ValueError("metrics and server_pid go with server (a running server)")
        if self.metrics is not None:
            _check_address(self.metrics, "metrics")
        if self.mode not in (None, "ar", "sd", "pearl", "auto"):
            raise ValueError(f"mode must be ar, sd, pearl or auto, got {self.mode!r}")
        if self.num_slots < 1 or self.max_waiting < 0:
            raise ValueError("num_slots must be >= 1 and max_waiting >= 0")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not self.leak_limit_mb >= 0:
            raise ValueError(f"leak_limit_mb must be >= 0, got {self.leak_limit_mb}")


def _check_address(address: str, name: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{name} must be HOST:PORT, got {address!r}")
