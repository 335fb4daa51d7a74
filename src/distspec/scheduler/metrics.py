"""Prometheus metrics. Speculation counters carry vLLM's names, so dashboards built for vLLM
read them unchanged; what vLLM lacks (target busy fraction, queue depth, active sessions)
is named distspec:*."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 3.0, 6.0, 12.0, 30.0)


class SchedulerMetrics:
    """Updated by the scheduler's loop; read by Prometheus scrapes (thread-safe objects)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.num_drafts = Counter(
            "vllm:spec_decode_num_drafts", "Verified drafts (rounds with draft tokens)", registry=r
        )
        self.num_draft_tokens = Counter(
            "vllm:spec_decode_num_draft_tokens", "Draft tokens verified", registry=r
        )
        self.num_accepted_tokens = Counter(
            "vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted", registry=r
        )
        self.accepted_per_pos = Counter(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Accepted draft tokens by position in the draft",
            ["position"],
            registry=r,
        )
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time from request to first token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between tokens of a session (a round's tokens share its time)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prefix_queries = Counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_hits = Counter(
            "vllm:prefix_cache_hits",
            "Prompt tokens whose K/V their KV slot held already (not prefilled again)",
            registry=r,
        )
        self.busy = Gauge(
            "distspec:target_busy_fraction",
            "Fraction of wall time the target computed, since the previous scrape",
            registry=r,
        )
        self.worker_cpus = Gauge(
            "distspec:worker_cpus",
            "CPUs per rank of each worker group; cores: those its ranks are pinned to",
            ["group", "cores"],
            registry=r,
        )

    def set_placement(self, plan: dict[str, tuple[float, list[tuple[int, ...]]]]) -> None:
        """plan: group -> (CPUs per rank, each rank's pinned cores), as RayCluster.plan."""
        for group, (cpus, cores) in plan.items():
            pinned = " | ".join(",".join(map(str, c)) for c in cores)
            self.worker_cpus.labels(group=group, cores=pinned).set(cpus)

    def on_verdict(self, num_draft: int, accepted: int) -> None:
        if num_draft:
            self.num_drafts.inc()
            self.num_draft_tokens.inc(num_draft)
            self.num_accepted_tokens.inc(accepted)
            for pos in range(accepted):
                self.accepted_per_pos.labels(position=str(pos)).inc()

    def on_tokens(self, n: int, since_previous_s: float | None) -> None:
        """n new tokens of a session; since_previous_s: time since its previous tokens."""
        if n == 0:
            return
        self.generation_tokens.inc(n)
        if since_previous_s is not None:
            for _ in range(n):
                self.itl.observe(since_previous_s / n)

    def on_first_token(self, ttft_s: float, prompt_tokens: int = 0, cached: int = 0) -> None:
        self.ttft.observe(ttft_s)
        self.prefix_queries.inc(prompt_tokens)
        self.prefix_hits.inc(cached)

    def watch(self, sessions, busy_s) -> None:
        """Gauges read at scrape time: sessions() gives (generating, waiting) in one reading,
        busy_s() the target's total compute seconds (the busy fraction is taken between
        scrapes)."""
        self.registry.register(_SessionGauges(sessions))
        mark = [time.perf_counter(), busy_s()]

        def busy_fraction() -> float:
            now, busy = time.perf_counter(), busy_s()
            wall, done = now - mark[0], busy - mark[1]
            mark[:] = [now, busy]
            return min(1.0, max(0.0, done / wall)) if wall > 0 else 0.0

        self.busy.set_function(busy_fraction)


class _SessionGauges(Collector):
    """distspec:active_sessions and distspec:queue_depth from ONE reading, so a scrape never
    sees a session twice (or not at all) while it moves from the queue to a slot."""

    def __init__(self, read):
        self.read = read

    def describe(self):
        return self._families(0, 0)

    def collect(self):
        return self._families(*self.read())

    @staticmethod
    def _families(generating: int, waiting: int) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "distspec:active_sessions",
                "Sessions generating in a KV slot (finished ones excluded: their slots count "
                "as free for admission)",
                value=generating,
            ),
            GaugeMetricFamily(
                "distspec:queue_depth", "Sessions waiting for a KV slot", value=waiting
            ),
        ]


def start_metrics_server(runtime, port: int, host: str = "0.0.0.0") -> None:
    """Serve runtime.scheduler.metrics on http://host:port/metrics (a daemon thread)."""
    start_http_server(port, addr=host, registry=runtime.scheduler.metrics.registry)
