"""`distspec bench-load`: N streaming clients held against a server for a fixed time.

Each client loops until the level's duration is up: a streaming Generate for the next
benchmark prompt, read to the end, then the next. A RESOURCE_EXHAUSTED refusal counts as a
rejection and the client waits the `retry-after-s` hint before it tries again. Requests
open at the deadline are read to their end (the drain), but throughput counts only the
tokens that arrived within the duration.

Measured per level: completed requests, aggregate tokens/s, time to first token and
inter-token latency (per token: a chunk of k tokens arriving dt after the previous one
counts k gaps of dt / k), rejections, errors by status code, the server's queue depth and
active sessions (scraped from its Prometheus endpoint) and the RSS of every process of the
server (the serve process and all its descendants: Ray's GCS, raylet, workers).

Admission is bounded when the sessions queued beyond the free slots (active + queued -
slots, from one reading of both gauges; active excludes finished sessions, whose slots
admission counts as free) never pass max_waiting. The raw queue depth can pass it for up
to one round: the scheduler moves waiting sessions into freed slots only at round
boundaries, and admits new ones against free slots + max_waiting meanwhile.

Leak check: at constant load a server's memory should be flat. For each level, the median
total RSS of the last third of the level (after a warm-up) minus that of its first third
must stay under `leak_limit_mb` (50 MB): a leak of a few KB per request or a retained tensor
per round (one logits row of the demo model is 200 KB) passes 50 MB within a minute, while
allocator noise stays at a few MB. Bounded caches still filling (oneDNN's primitive cache,
Ray's task events in GCS) show as growth too; the per-process figures tell which process
grew. Growth across levels is reported but not judged: more clients hold more buffers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil
from tqdm import tqdm

from distspec.bench.grpc_client import chat_request, generate_stub
from distspec.bench.load_config import LoadConfig
from distspec.bench.procmem import MB, ProcessMemory, ProcessTreeSampler, RssGrowth
from distspec.bench.prom import GaugePoller, Scrape
from distspec.bench.serve_process import ServeProcess, free_port
from distspec.bench.streams import percentile, scaled, stream_generate
from distspec.datasets import load_prompts

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 600.0
DEFAULT_RETRY_S = 0.5  # a refusal without a hint (a per-client limit)
ERROR_BACKOFF_S = 0.5  # so a broken server is not hammered in a tight loop
READY_TIMEOUT_S = 60.0


@dataclass
class LevelResult:
    clients: int
    duration_s: float
    wall_s: float  # with the drain
    attempts: int
    completed: int
    tokens: int  # arrived within the duration
    tokens_per_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    rejections: int
    rejection_rate: float
    errors: dict[str, int]  # status code name -> count (RESOURCE_EXHAUSTED is a rejection)
    queue_depth_max: float | None  # distspec:queue_depth; None: no metrics endpoint
    active_max: float | None  # distspec:active_sessions
    # sessions queued beyond the free slots (active + queued - slots, one scrape): what
    # admission bounds by max_waiting. The raw queue depth can exceed max_waiting for up to
    # a round, by sessions admitted into slots that free up at the next round boundary.
    queued_beyond_slots_max: float | None
    busy_fraction_mean: float | None
    scrape_failures: int  # the metrics endpoint did not answer
    rss_start_mb: float | None  # total over the server's processes; None: not measured
    rss_end_mb: float | None
    rss_growth: RssGrowth | None  # after the warm-up, within the duration
    t0: float  # time.monotonic() at the start


@dataclass
class LoadReport:
    config: LoadConfig
    server: dict
    levels: list[LevelResult]
    processes: list[ProcessMemory]
    run_growth: RssGrowth | None  # the whole run after the first warm-up (not judged)
    leak: bool | None  # a level grew more than leak_limit_mb; None: RSS not measured
    admission_bounded: bool | None  # queued beyond the slots <= max_waiting; None: no metrics
    queue_within_max_waiting: bool | None  # the raw queue depth too (see LevelResult)
    # every RSS sample: t (s since the first level started), total and per-process MB
    rss_series: dict
    gauge_series: list[dict]
    machine: dict

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _ClientStats:
    attempts: int = 0
    completed: int = 0
    rejections: int = 0
    tokens: int = 0
    errors: Counter = field(default_factory=Counter)
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens)


@dataclass
class _Target:
    address: str
    metrics: str | None
    pid: int | None
    log: str | None = None


def run_load_bench(config: LoadConfig) -> LoadReport:
    prompts = load_prompts()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}
    with _server(config, out) as target:
        sampler = ProcessTreeSampler(target.pid, config.rss_interval_s) if target.pid else None
        if sampler is not None:
            sampler.start()
        levels: list[LevelResult] = []
        scrapes: list[list[Scrape]] = []
        channel = grpc.insecure_channel(target.address)
        try:
            try:
                grpc.channel_ready_future(channel).result(timeout=READY_TIMEOUT_S)
            except grpc.FutureTimeoutError:
                raise RuntimeError(
                    f"no server answers at {target.address} (waited {READY_TIMEOUT_S:g} s)"
                ) from None
            stub = generate_stub(channel)
            for n in config.clients:
                level, level_scrapes = _run_level(stub, n, prompts, config, sampler, target)
                levels.append(level)
                scrapes.append(level_scrapes)
        finally:
            channel.close()
            if sampler is not None:
                sampler.stop()
    machine["loadavg_end"] = os.getloadavg()
    report = _report(config, target, levels, scrapes, sampler, machine)
    (out / "load.json").write_text(json.dumps(report.to_dict(), indent=1))
    from distspec.bench.load_plot import plot_load

    plot_load(report, out / "load.png")
    return report


@contextlib.contextmanager
def _server(config: LoadConfig, out: Path) -> Iterator[_Target]:
    if config.server is not None:
        if config.server_pid is not None and not psutil.pid_exists(config.server_pid):
            raise ValueError(f"server_pid: no process {config.server_pid} on this machine")
        yield _Target(config.server, config.metrics, config.server_pid)
        return
    metrics_port = free_port()
    args = ["--target", config.target, "--drafter", config.drafter or "none"]
    args += ["--num-slots", str(config.num_slots), "--max-waiting", str(config.max_waiting)]
    args += ["--max-len", str(config.max_len), "--metrics-port", str(metrics_port)]
    if config.mode:
        args += ["--mode", config.mode]
    if not config.use_ray:
        args.append("--no-ray")
    proc = ServeProcess(args, out / "serve.log")
    t = time.monotonic()
    address = proc.start(config.start_timeout_s)
    log.info("distspec serve up on %s in %.1f s", address, time.monotonic() - t)
    try:
        yield _Target(address, f"127.0.0.1:{metrics_port}", proc.pid, str(proc.log_path))
    finally:
        rc = proc.stop()
        if rc not in (0, None):
            log.warning("distspec serve exited with %s (log: %s)", rc, proc.log_path)


def _run_level(
    stub,
    clients: int,
    prompts: list[str],
    config: LoadConfig,
    sampler: ProcessTreeSampler | None,
    target: _Target,
) -> tuple[LevelResult, list[Scrape]]:
    poller = GaugePoller(target.metrics, config.scrape_interval_s) if target.metrics else None
    if poller is not None:
        poller.start()
    stop = threading.Event()
    t0 = time.monotonic()
    deadline = t0 + config.duration_s
    stats = [_ClientStats() for _ in range(clients)]
    threads = [
        threading.Thread(
            target=_client,
            args=(stub, prompts, i, stats[i], deadline, config, stop),
            name=f"load-client-{i}",
            daemon=True,
        )
        for i in range(clients)
    ]
    for th in threads:
        th.start()
    try:
        _show_progress(clients, stats, t0, deadline, threads, sampler)
    finally:
        stop.set()  # ends the retry waits; open streams are read to their end
        for th in threads:
            th.join()
    t_end = time.monotonic()
    scrapes = poller.stop() if poller is not None else []
    failures = poller.failures if poller is not None else 0
    level = _summarize(clients, stats, scrapes, failures, sampler, config, t0, deadline, t_end)
    return level, scrapes


def _client(
    stub,
    prompts: list[str],
    index: int,
    stats: _ClientStats,
    deadline: float,
    config: LoadConfig,
    stop: threading.Event,
) -> None:
    k = index
    while time.monotonic() < deadline and not stop.is_set():
        request = chat_request(prompts[k % len(prompts)], config.max_new_tokens, config.temperature)
        k += 1
        stats.attempts += 1
        try:
            r = stream_generate(stub, request, REQUEST_TIMEOUT_S)
        except Exception as e:  # counted, not fatal: the report shows it
            log.exception("client %d", index)
            stats.errors[type(e).__name__] += 1
            stop.wait(ERROR_BACKOFF_S)
            continue
        if r.ttft_s is not None:
            stats.ttft_s.append(r.ttft_s)
        stats.itl_s.extend(gap for _, gap in r.itl_s())
        stats.tokens += len(r.token_ids)
        stats.chunks += r.chunks
        if r.code is None:
            stats.completed += 1
            continue
        if r.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            stats.rejections += 1
            wait = DEFAULT_RETRY_S if r.retry_after_s is None else r.retry_after_s
        else:
            stats.errors[r.code.name] += 1
            wait = ERROR_BACKOFF_S
        stop.wait(min(wait, max(0.0, deadline - time.monotonic())))


def _show_progress(clients, stats, t0, deadline, threads, sampler) -> None:
    bar = tqdm(total=round(deadline - t0), desc=f"{clients} clients", unit="s")
    shown = 0
    while any(th.is_alive() for th in threads):
        time.sleep(1.0)
        now = time.monotonic()
        elapsed = min(now, deadline) - t0
        tokens = sum(s.tokens for s in stats)
        rss = sampler.samples[-1] if sampler is not None and sampler.samples else None
        bar.set_postfix(
            done=sum(s.completed for s in stats),
            tok_s=f"{tokens / max(1e-9, now - t0):.1f}",
            rejected=sum(s.rejections for s in stats),
            errors=sum(sum(s.errors.values()) for s in stats),
            rss_mb=f"{sum(rss.rss.values()) / MB:.0f}" if rss else "-",
        )
        step = round(elapsed) - shown
        if step > 0:
            bar.update(step)
            shown += step
        if now > deadline:
            bar.set_description(f"{clients} clients (draining)")
    bar.close()


def _summarize(
    clients: int,
    stats: list[_ClientStats],
    scrapes: list[Scrape],
    scrape_failures: int,
    sampler: ProcessTreeSampler | None,
    config: LoadConfig,
    t0: float,
    deadline: float,
    t_end: float,
) -> LevelResult:
    attempts = sum(s.attempts for s in stats)
    rejections = sum(s.rejections for s in stats)
    errors: Counter = Counter()
    for s in stats:
        errors.update(s.errors)
    tokens = sum(n for s in stats for t, n in s.chunks if t <= deadline)
    ttft = [x for s in stats for x in s.ttft_s]
    itl = [x for s in stats for x in s.itl_s]
    rss_start = rss_end = growth = None
    if sampler is not None:
        window = sampler.window(t0, t_end)
        if window:
            rss_start = sum(window[0].rss.values()) / MB
            rss_end = sum(window[-1].rss.values()) / MB
        growth = sampler.growth(t0 + config.warmup_s, deadline)
    return LevelResult(
        clients=clients,
        duration_s=config.duration_s,
        wall_s=t_end - t0,
        attempts=attempts,
        completed=sum(s.completed for s in stats),
        tokens=tokens,
        tokens_per_s=tokens / config.duration_s,
        ttft_p50_s=percentile(ttft, 50),
        ttft_p99_s=percentile(ttft, 99),
        itl_p50_ms=scaled(percentile(itl, 50), 1000),
        itl_p99_ms=scaled(percentile(itl, 99), 1000),
        rejections=rejections,
        rejection_rate=rejections / attempts if attempts else 0.0,
        errors=dict(errors),
        queue_depth_max=max((s.queue for s in scrapes), default=None),
        active_max=max((s.active for s in scrapes), default=None),
        queued_beyond_slots_max=max(
            (max(0.0, s.queue + s.active - config.num_slots) for s in scrapes), default=None
        ),
        busy_fraction_mean=float(np.mean([s.busy for s in scrapes])) if scrapes else None,
        scrape_failures=scrape_failures,
        rss_start_mb=rss_start,
        rss_end_mb=rss_end,
        rss_growth=growth,
        t0=t0,
    )


def _report(config, target, levels, scrapes, sampler, machine) -> LoadReport:
    growths = [lv.rss_growth for lv in levels]
    leak = None
    run_growth = None
    rss_series: dict = {"t_s": [], "total_mb": [], "per_process_mb": {}}
    processes: list[ProcessMemory] = []
    if any(g is not None for g in growths):
        leak = any(g is not None and g.growth_mb > config.leak_limit_mb for g in growths)
    if sampler is not None and sampler.samples and levels:
        start = levels[0].t0
        run = (start + config.warmup_s, levels[-1].t0 + config.duration_s)
        run_growth = sampler.growth(*run)
        processes = sampler.processes(*run)
        for s in sampler.samples:
            rss_series["t_s"].append(round(s.t - start, 2))
            rss_series["total_mb"].append(round(sum(s.rss.values()) / MB, 1))
        for p in processes:
            rss_series["per_process_mb"][f"{p.label} ({p.pid})"] = [
                round(s.rss.get(p.pid, 0) / MB, 1) for s in sampler.samples
            ]
    queues = [lv.queue_depth_max for lv in levels if lv.queue_depth_max is not None]
    beyond = [lv.queued_beyond_slots_max for lv in levels if lv.queue_depth_max is not None]
    admission_bounded = max(beyond) <= config.max_waiting if beyond else None
    queue_within = max(queues) <= config.max_waiting if queues else None
    gauge_series = [
        {
            "clients": lv.clients,
            "t_s": [round(s.t - lv.t0, 2) for s in ss],
            "queue": [s.queue for s in ss],
            "active": [s.active for s in ss],
        }
        for lv, ss in zip(levels, scrapes, strict=True)
    ]
    server = {"address": target.address, "metrics": target.metrics, "pid": target.pid}
    server["started"] = config.server is None
    server["log"] = target.log
    return LoadReport(
        config=config,
        server=server,
        levels=levels,
        processes=processes,
        run_growth=run_growth,
        leak=leak,
        admission_bounded=admission_bounded,
        queue_within_max_waiting=queue_within,
        rss_series=rss_series,
        gauge_series=gauge_series,
        machine=machine,
    )


def format_table(report: LoadReport) -> str:
    """The per-level table, the per-process RSS table and the verdicts."""

    def f(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        f"{'clients':>7} {'done':>6} {'tok/s':>7} {'ttft p50/p99 s':>15} "
        f"{'itl p50/p99 ms':>15} {'rejected':>14} {'errors':>6} {'queue max':>9} "
        f"{'rss MB start/end':>17} {'growth MB':>9}"
    ]
    for lv in report.levels:
        errors = sum(lv.errors.values())
        growth = lv.rss_growth.growth_mb if lv.rss_growth else None
        lines.append(
            f"{lv.clients:>7} {lv.completed:>6} {lv.tokens_per_s:>7.1f} "
            f"{f(lv.ttft_p50_s, '.2f'):>7}/{f(lv.ttft_p99_s, '<7.2f')} "
            f"{f(lv.itl_p50_ms, '.0f'):>7}/{f(lv.itl_p99_ms, '<7.0f')} "
            f"{lv.rejections:>6} ({lv.rejection_rate:>4.0%}) {errors:>6} "
            f"{f(lv.queue_depth_max, '.0f'):>9} "
            f"{f(lv.rss_start_mb, '.0f'):>8}/{f(lv.rss_end_mb, '<8.0f')} {f(growth, '+.1f'):>9}"
        )
    for lv in report.levels:
        if lv.errors:
            codes = ", ".join(f"{k} {v}" for k, v in sorted(lv.errors.items()))
            lines.append(f"errors at {lv.clients} clients: {codes}")
    if report.processes:
        lines += [
            "",
            f"{'process':<32} {'pid':>8} {'start MB':>9} {'end MB':>9} {'max MB':>9} "
            f"{'run growth MB':>13}",
        ]
        for p in report.processes:
            lines.append(
                f"{p.label[:32]:<32} {p.pid:>8} {p.start_mb:>9.1f} {p.end_mb:>9.1f} "
                f"{p.max_mb:>9.1f} {f(p.growth_mb, '+.1f'):>13}"
            )
        totals = report.rss_series["total_mb"]
        run = report.run_growth.growth_mb if report.run_growth else None
        lines.append(
            f"{'total':<32} {'':>8} {totals[0]:>9.1f} {totals[-1]:>9.1f} {max(totals):>9.1f} "
            f"{f(run, '+.1f'):>13}"
        )
    cfg = report.config
    if report.leak is not None:
        worst = max((lv.rss_growth.growth_mb for lv in report.levels if lv.rss_growth), default=0)
        run = report.run_growth.growth_mb if report.run_growth else 0.0
        verdict = (
            "ABOVE THE LIMIT (a leak, or a cache still filling: see the processes)"
            if report.leak
            else "no leak"
        )
        lines.append(
            f"RSS growth at constant load: at most {worst:+.1f} MB per level (limit "
            f"{cfg.leak_limit_mb:g} MB): {verdict}; whole run {run:+.1f} MB "
            f"({len(report.processes)} processes)"
        )
    if report.admission_bounded is not None:
        measured = [lv for lv in report.levels if lv.queue_depth_max is not None]
        queue = max(lv.queue_depth_max for lv in measured)
        beyond = max(lv.queued_beyond_slots_max for lv in measured)
        verdict = "bounded" if report.admission_bounded else "NOT BOUNDED"
        lines.append(
            f"admission: queue depth at most {queue:.0f}, queued beyond the free slots at most "
            f"{beyond:.0f} (max_waiting {cfg.max_waiting}, {cfg.num_slots} slots): {verdict}"
        )
    return "\n".join(lines)
