"""`distspec bench-edge`: an edge drafter against a server, across emulated round-trip times.

The server (`distspec serve --no-ray --drafter none`, its own process) holds the target; this
process is the device: it runs the drafter and reaches the server through a DelayRelay adding
RTT/2 each way. Contenders, alternated per prompt: edge with overlap, edge stop-and-wait, and
server-only plain decoding (`Generate`, no drafter). Reported per (contender, RTT): median
tokens/s and inter-token latency ((wall - time to first token) / (tokens - 1)), with the
measured RTT and the fraction of rounds whose RTT was hidden.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from distspec.datasets import load_prompts

log = logging.getLogger(__name__)

CONTENDERS = ("edge-overlap", "edge-stop-wait", "server-ar")


@dataclass
class EdgeBenchConfig:
    target: str = "demo"
    drafter: str = "demo"
    rtts_ms: list[float] = field(default_factory=lambda: [0, 20, 50, 100])
    num_prompts: int = 6
    max_new_tokens: int = 64
    gamma: int = 4
    server_threads: int = 1
    client_threads: int = 1
    out_dir: str = "bench-results"


def run_edge_bench(config: EdgeBenchConfig) -> dict:
    import grpc
    import torch

    from distspec.bench.relay import DelayRelay
    from distspec.edge_client import EdgeClient
    from distspec.spec_decode.drafters.factory import load_drafter, new_drafter
    from distspec.spec_decode.sampling import SamplingParams
    from distspec.v1 import speculative_decoding_pb2 as pb
    from distspec.v1 import speculative_decoding_pb2_grpc as pb_grpc

    torch.set_num_threads(config.client_threads)
    prompts = load_prompts(limit=config.num_prompts)
    server, address = _start_server(config)
    loaded = load_drafter(config.drafter, config.target, max_len=2048)
    drafter = new_drafter(loaded, name=config.drafter)
    params = SamplingParams(max_new_tokens=config.max_new_tokens)
    runs = []
    try:
        bar = tqdm(total=len(config.rtts_ms) * len(prompts) * len(CONTENDERS), desc="bench-edge")
        for rtt in config.rtts_ms:
            relay = DelayRelay(address, delay_s=rtt / 2000).start()
            clients = {
                overlap: EdgeClient(relay.address, drafter, config.gamma, overlap=overlap)
                for overlap in (True, False)
            }
            channel = grpc.insecure_channel(relay.address)
            stub = pb_grpc.SpeculativeDecodingStub(channel)
            try:
                for i, prompt in enumerate(prompts):
                    order = CONTENDERS[i % 3 :] + CONTENDERS[: i % 3]
                    for name in order:
                        if name == "server-ar":
                            r = _server_ar(stub, pb, prompt, config.max_new_tokens)
                        else:
                            client = clients[name == "edge-overlap"]
                            r = _edge(client, params, prompt)
                        runs.append({"contender": name, "rtt_ms": rtt, "prompt": i, **r})
                        bar.set_postfix(rtt=rtt, contender=name, tok_s=f"{r['tokens_per_s']:.1f}")
                        bar.update()
            finally:
                for c in clients.values():
                    c.close()
                channel.close()
                relay.stop()
        bar.close()
    finally:
        server.terminate()
        server.wait(timeout=60)
    summary = {}
    for name in CONTENDERS:
        for rtt in config.rtts_ms:
            rs = [r for r in runs if r["contender"] == name and r["rtt_ms"] == rtt]
            summary[f"{name}@{rtt:g}"] = {
                k: statistics.median(r[k] for r in rs)
                for k in ("tokens_per_s", "itl_ms", "measured_rtt_ms", "hidden_rtt_fraction", "tau")
            }
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"config": asdict(config), "runs": runs, "summary": summary}
    (out / "edge.json").write_text(json.dumps(report, indent=2))
    plot_edge(summary, config, out / "edge.png")
    return report


def _edge(client, params, prompt: str) -> dict:
    t = time.perf_counter()
    n, first, last = 0, None, None
    for step in client.generate(params, messages=[("user", prompt)]):
        n += len(step.token_ids)
        first = first or time.perf_counter()
        last = step
    wall = time.perf_counter() - t
    s = last.stats
    return {
        "tokens": n,
        "tokens_per_s": n / wall,
        "itl_ms": 1000 * (time.perf_counter() - first) / max(1, n - 1),
        "measured_rtt_ms": s.rtt_ms,
        "hidden_rtt_fraction": s.hidden_rtt_fraction,
        "tau": s.tokens_per_target_forward,
    }


def _server_ar(stub, pb, prompt: str, max_new_tokens: int) -> dict:
    request = pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content=prompt)], max_new_tokens=max_new_tokens
    )
    t = time.perf_counter()
    n, first = 0, None
    for r in stub.Generate(request, timeout=600):
        n += len(r.token_ids)
        first = first or time.perf_counter()
    wall = time.perf_counter() - t
    return {
        "tokens": n,
        "tokens_per_s": n / wall,
        "itl_ms": 1000 * (time.perf_counter() - first) / max(1, n - 1),
        "measured_rtt_ms": 0.0,
        "hidden_rtt_fraction": 0.0,
        "tau": 1.0,
    }


def _start_server(config: EdgeBenchConfig) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, "-m", "distspec", "serve", "--no-ray", "--drafter", "none"]
    args += ["--target", config.target, "--port", "0", "--host", "127.0.0.1"]
    args += ["--num-slots", "4", "--max-len", "2048", "--threads", str(config.server_threads)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"on (\S+):(\d+)$", line.strip())
    if not match:
        proc.kill()
        raise RuntimeError(f"the benchmark server did not start: {line!r}")
    return proc, f"127.0.0.1:{match.group(2)}"


def plot_edge(summary: dict, config: EdgeBenchConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name in CONTENDERS:
        rtts = config.rtts_ms
        ax1.plot(rtts, [summary[f"{name}@{r:g}"]["tokens_per_s"] for r in rtts], "o-", label=name)
        ax2.plot(rtts, [summary[f"{name}@{r:g}"]["itl_ms"] for r in rtts], "o-", label=name)
    ax1.set_xlabel("round-trip time (ms)")
    ax1.set_ylabel("tokens/s (median over prompts)")
    ax2.set_xlabel("round-trip time (ms)")
    ax2.set_ylabel("inter-token latency (ms)")
    ax1.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    ax1.legend(fontsize=8)
    fig.suptitle(
        f"edge drafter {config.drafter} -> server {config.target} through a delaying relay, "
        f"greedy, {config.max_new_tokens} tokens",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
