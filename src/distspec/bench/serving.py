"""`distspec bench-serve`: the distributed runtime under load, through its gRPC front end.

One runtime (Ray workers, or in-process ones) serves every measurement; the scheduler's mode
is switched between runs (while idle), so modes are compared on the same workers, alternated
within each repetition. For each concurrency level, that many client threads send the
benchmark prompts (each client one request at a time) until all are answered.

Reported per (mode, clients): aggregate tokens/s, target busy fraction (the target's compute
time / wall time), tau (tokens per target forward), median time to first token.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from tqdm import tqdm

from distspec.bench.grpc_client import chat_request, generate_stub
from distspec.bench.streams import Streamed, add_chunk, percentile, scaled
from distspec.datasets import load_prompts
from distspec.spec_decode.defaults import BENCH_TREE_WIDTH

if TYPE_CHECKING:
    from distspec.scheduler.scheduler import RoundTimes

TREE = "-tree"

log = logging.getLogger(__name__)


@dataclass
class ServingBenchConfig:
    target: str = "demo"
    drafter: str = "demo"
    target_tp: int = 1
    drafter_tp: int = 1
    num_drafters: int = 1
    modes: list[str] = field(default_factory=lambda: ["sd", "pearl"])
    clients: list[int] = field(default_factory=lambda: [1, 4, 16])
    max_new_tokens: int = 64
    repeats: int = 1
    temperature: float = 0.0
    gamma: int = 4
    num_slots: int = 16
    decode_steps: int = 4  # plain rounds' tokens per target call (SchedulerConfig)
    prefix_cache: bool = True  # prompts reuse what their KV slot holds of them
    use_ray: bool = True
    out_dir: str = "bench-results"


def run_serving_bench(config: ServingBenchConfig) -> dict:
    from distspec.server.grpc_server import GrpcServer
    from distspec.server.serve import ServeConfig

    serve = ServeConfig(
        port=0,
        host="127.0.0.1",
        use_ray=config.use_ray,
        target=config.target,
        target_tp=config.target_tp,
        drafter=config.drafter,
        drafter_tp=config.drafter_tp,
        num_drafters=config.num_drafters,
        # start in a mode that drafts, if any does: the runtime then has drafters for it
        mode=next((_mode(m)[0] for m in config.modes if m != "ar"), config.modes[0]),
        gamma=config.gamma,
        num_slots=config.num_slots,
        max_len=1024,
        max_waiting=max(config.clients),
        decode_steps=config.decode_steps,
        prefix_cache=config.prefix_cache,
    )
    from distspec.scheduler.runtime import Runtime

    prompts = load_prompts()
    t0 = time.perf_counter()
    runtime = Runtime(serve.runtime_config())
    log.info("runtime up in %.1f s; costs %s", time.perf_counter() - t0, runtime.costs)
    server = GrpcServer(runtime, 0, "127.0.0.1")
    port = server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    runs: list[dict] = []
    try:
        for mode in config.modes:  # warm-up
            runtime.scheduler.set_mode(*_mode(mode))
            _load(channel, runtime, prompts[:1], 1, config)
        total = config.repeats * len(config.clients) * len(config.modes)
        bar = tqdm(total=total, desc="bench-serve", unit="run")
        for rep in range(config.repeats):
            for n in config.clients:
                order = (
                    config.modes[rep % len(config.modes) :]
                    + config.modes[: rep % len(config.modes)]
                )
                for mode in order:
                    runtime.scheduler.set_mode(*_mode(mode))
                    # each run from cold KV slots: it reuses only its own prompts' K/V
                    runtime.scheduler.forget_prefixes()
                    result = _load(channel, runtime, prompts, n, config)
                    runs.append({"mode": mode, "clients": n, "repeat": rep, **result})
                    bar.set_postfix(mode=mode, clients=n, tok_s=f"{result['tokens_per_s']:.1f}")
                    bar.update()
        bar.close()
    finally:
        channel.close()
        server.stop(1)
        runtime.close()
    summary = _summarize(runs, config)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "config": asdict(config),
        "costs": asdict(runtime.costs) if runtime.costs else None,
        "runs": runs,
        "summary": summary,
    }
    (out / "serving.json").write_text(json.dumps(report, indent=2))
    plot_serving(summary, out / "serving.png", config)
    return report


def _mode(name: str) -> tuple[str, int]:
    """(scheduler mode, drafters' tree width) of a bench-serve mode: ar, sd, pearl, auto, or
    sd-tree / auto-tree (token trees of width BENCH_TREE_WIDTH)."""
    base = name.removesuffix(TREE)
    return base, (BENCH_TREE_WIDTH if name.endswith(TREE) else 1)


def _load(channel, runtime, prompts: list[str], clients: int, config) -> dict:
    """clients threads answer max(len(prompts), clients) requests; aggregate figures."""
    stub = generate_stub(channel)
    work: queue.Queue = queue.Queue()
    for i in range(max(len(prompts), clients)):
        work.put(prompts[i % len(prompts)])
    stats, errors, itls = [], [], []

    def client() -> None:
        while True:
            try:
                prompt = work.get_nowait()
            except queue.Empty:
                return
            request = chat_request(prompt, config.max_new_tokens, config.temperature)
            try:
                seen = Streamed(sent=time.monotonic())
                for response in stub.Generate(request, timeout=600):
                    add_chunk(seen, list(response.token_ids))
                stats.append(response.stats)  # the last response carries them
                itls.extend(gap for _, gap in seen.itl_s())
            except grpc.RpcError as e:
                errors.append(e.details())

    busy0 = runtime.scheduler.target_busy_s
    times0 = dataclasses.replace(runtime.scheduler.times)
    t = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    tokens = sum(s.new_tokens for s in stats)
    forwards = sum(s.target_forwards for s in stats)
    times = runtime.scheduler.times
    drafted = sum(s.draft_tokens for s in stats)
    return {
        "requests": len(stats),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "target_busy_fraction": (runtime.scheduler.target_busy_s - busy0) / wall,
        "tau": tokens / forwards if forwards else 0.0,
        "acceptance_rate": sum(s.accepted_tokens for s in stats) / drafted if drafted else 0.0,
        "ttft_median_s": statistics.median(s.time_to_first_token_s for s in stats),
        # of the prompts' tokens, those their KV slot held (not prefilled again)
        "cached_fraction": sum(s.cached_tokens for s in stats)
        / max(1, sum(s.prompt_tokens for s in stats)),
        # inter-token latency as the clients saw it (a chunk of k tokens: k gaps of dt / k)
        "itl_p50_ms": scaled(percentile(itls, 50), 1e3),
        "itl_p99_ms": scaled(percentile(itls, 99), 1e3),
        "round_ms": round_breakdown(times0, times),
        # target forwards per round (several in a multi-step plain round)
        "steps_per_round": (times.steps - times0.steps) / max(1, times.rounds - times0.rounds),
    }


def round_breakdown(before: RoundTimes, after: RoundTimes) -> dict[str, float] | None:
    """Mean milliseconds per decoding round between two RoundTimes: the whole round, the
    drafters' calls, the target call (transport, batching, verifying and the forward) and the
    forward itself; the rest of a round is the scheduler's own work."""
    rounds = after.rounds - before.rounds
    if not rounds:
        return None
    parts = ("round_s", "draft_s", "target_call_s", "forward_s")
    ms = {p[:-2]: (getattr(after, p) - getattr(before, p)) / rounds * 1e3 for p in parts}
    ms["scheduler"] = ms["round"] - ms["draft"] - ms["target_call"]
    return ms


def _summarize(runs: list[dict], config: ServingBenchConfig) -> dict:
    summary: dict = {}
    for mode in config.modes:
        for n in config.clients:
            rs = [r for r in runs if r["mode"] == mode and r["clients"] == n]
            summary[f"{mode}@{n}"] = {
                key: _median([r[key] for r in rs if r[key] is not None])
                for key in (
                    "tokens_per_s",
                    "target_busy_fraction",
                    "tau",
                    "ttft_median_s",
                    "itl_p50_ms",
                    "itl_p99_ms",
                    "steps_per_round",
                    "cached_fraction",
                )
            }
            breakdowns = [r["round_ms"] for r in rs if r.get("round_ms")]
            summary[f"{mode}@{n}"]["round_ms"] = (
                {p: _median([b[p] for b in breakdowns]) for p in breakdowns[0]}
                if breakdowns
                else None
            )
    return summary


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def plot_serving(summary: dict, path: Path, config: ServingBenchConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.2 * len(config.clients) + 2, 4))
    width = 0.8 / len(config.modes)
    for i, mode in enumerate(config.modes):
        xs = [j + i * width for j in range(len(config.clients))]
        ys = [summary[f"{mode}@{n}"]["tokens_per_s"] for n in config.clients]
        bars = ax.bar(xs, ys, width, label=mode)
        for bar, n in zip(bars, config.clients, strict=True):
            s = summary[f"{mode}@{n}"]
            ax.annotate(
                f"{s['tokens_per_s']:.0f}\nbusy {s['target_busy_fraction']:.2f}\n"
                f"tau {s['tau']:.2f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_xticks([j + width * (len(config.modes) - 1) / 2 for j in range(len(config.clients))])
    ax.set_xticklabels([f"{n} client{'s' if n > 1 else ''}" for n in config.clients])
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title(
        f"distspec serving: {config.target} TP={config.target_tp}, drafter {config.drafter}, "
        f"T={config.temperature}, {config.max_new_tokens} new tokens",
        fontsize=9,
    )
    top = max(summary[k]["tokens_per_s"] for k in summary)
    ax.set_ylim(0, top * 1.35)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
