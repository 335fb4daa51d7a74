"""The harnesses: `distspec bench`, `bench-serve`, `bench-load`, `bench-chaos`, `bench-edge`,
`bench-easyspec`, `bench-kernels`."""

from __future__ import annotations

import argparse
import json

from distspec.cli.args import (
    exact_layers,
    positive_ints,
)
from distspec.spec_decode.defaults import DEFAULT_GAMMA


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmark distspec against transformers (one process)")
    p.add_argument("--target", default="demo", help="demo | PATH (HF dir or .gguf)")
    p.add_argument(
        "--contenders",
        default="hf-ar,hf-lookup,ar,sd-ngram,sd-demo,sd-self",
        help="comma list of: hf-ar, hf-lookup, ar, ar-int8, ar-int4 (-x8: int8 activations), "
        "sd-self (-int4, -int8, -bf16: a quantized copy of the target drafts), sd-ngram, "
        "sd-suffix, sd-recycle, sd-demo, sd-demo-model, sd:PATH, sd-model:PATH (the -model "
        "forms draft without prompt lookup), sd-self/sd-demo/sd-suffix/sd-recycle + -tree "
        "(token trees, width 3), pearl-self, auto-self, pearl-demo, auto-demo (PEARL, or the "
        "mode generate picks), any of these +pin (the drafter pinned to a core of its own), "
        "llama.cpp-f32, llama.cpp-native, llama.cpp-sd (make bench-peers)",
    )
    p.add_argument(
        "--prompts",
        default=None,
        help="JSON file of prompts or conversations, or a built-in set: benchmark (default), "
        "repetitive (multi-turn edits of earlier answers)",
    )
    p.add_argument(
        "--num-prompts", type=int, default=None, help="use the first N prompts (default: all)"
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=128, help="tokens per prompt (default %(default)s)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="passes over the prompts; medians reported (default %(default)s)",
    )
    p.add_argument(
        "--gamma", type=int, default=DEFAULT_GAMMA, help="draft tokens per round (the most)"
    )
    p.add_argument(
        "--adaptive",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="distspec contenders adapt the draft length (off: always --gamma)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument(
        "--seed", type=int, default=0, help="prompt i samples with seed SEED+i (default 0)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own)"
    )
    p.add_argument(
        "--drafter-cpus",
        type=int,
        default=0,
        metavar="N",
        help="speculative contenders pin their drafter to the last N cores and the target to "
        "the others (as generate --drafter-cpus; default 0: both use every core)",
    )
    p.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="distspec contenders prefill every prompt whole (default: each reuses what its "
        "KV slot holds of the prompt's start, its own last request's)",
    )
    p.add_argument("--out", default="bench-results", help="directory for JSON and PNG")
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from distspec.bench.runner import BenchConfig, run_bench

    config = BenchConfig(
        target=args.target,
        contenders=[c.strip() for c in args.contenders.split(",") if c.strip()],
        prompts_file=args.prompts,
        num_prompts=args.num_prompts,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        gamma=args.gamma,
        adaptive=args.adaptive,
        temperature=args.temperature,
        seed=args.seed,
        threads=args.threads,
        drafter_cpus=args.drafter_cpus,
        prefix_cache=args.prefix_cache,
        out_dir=args.out,
    )
    run_bench(config)
    return 0


def add_bench_serve(sub) -> None:
    p = sub.add_parser(
        "bench-serve", help="benchmark the distributed runtime under load (gRPC clients)"
    )
    p.add_argument("--target", default="demo", help="demo | a model path (default demo)")
    p.add_argument("--drafter", default="demo", help="demo | ngram | a model path (default demo)")
    p.add_argument(
        "--target-tp", type=int, default=1, help="tensor-parallel ranks of the target (default 1)"
    )
    p.add_argument(
        "--drafter-tp", type=int, default=1, help="ranks of each drafter group (default 1)"
    )
    p.add_argument("--num-drafters", type=int, default=1, help="drafter groups (default 1)")
    p.add_argument(
        "--modes",
        default="sd,pearl",
        help="comma list of ar, sd, pearl, auto, sd-tree, auto-tree (-tree: token trees, width 3)",
    )
    p.add_argument("--clients", default="1,4,16", help="comma list of concurrency levels")
    p.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens per request (default %(default)s)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of every (mode, clients) pair, modes rotated; medians reported (default 1)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--gamma", type=int, default=4, help="longest draft per round (default 4)")
    p.add_argument(
        "--num-slots", type=int, default=16, help="concurrent sessions (KV slots; default 16)"
    )
    p.add_argument(
        "--decode-steps",
        type=int,
        default=4,
        help="plain rounds decode up to this many tokens a session per target call (default 4)",
    )
    p.add_argument(
        "--no-ray",
        dest="use_ray",
        action="store_false",
        help="run the workers in this process (tensor parallel size 1)",
    )
    p.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="prefill every prompt whole (default: a prompt reuses what its KV slot holds)",
    )
    p.add_argument("--out", default="bench-results", help="directory for JSON and PNG")
    p.set_defaults(func=_bench_serve)


def _bench_serve(args: argparse.Namespace) -> int:
    from distspec.bench.serving import ServingBenchConfig, run_serving_bench

    config = ServingBenchConfig(
        target=args.target,
        drafter=args.drafter,
        target_tp=args.target_tp,
        drafter_tp=args.drafter_tp,
        num_drafters=args.num_drafters,
        modes=[m.strip() for m in args.modes.split(",") if m.strip()],
        clients=[int(c) for c in args.clients.split(",") if c.strip()],
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        temperature=args.temperature,
        gamma=args.gamma,
        num_slots=args.num_slots,
        decode_steps=args.decode_steps,
        prefix_cache=args.prefix_cache,
        use_ray=args.use_ray,
        out_dir=args.out,
    )
    report = run_serving_bench(config)
    header = f"{'mode@clients':<14} {'tok/s':>8} {'busy':>6} {'tau':>6} {'ttft s':>7}"
    print(
        f"{header} {'itl p50 ms':>10} {'itl p99 ms':>10} {'steps':>5} {'cached':>6}"
        "  round ms: all / draft / call / fwd"
    )
    for key, s in report["summary"].items():
        r = s.get("round_ms") or {}
        parts = " / ".join(_ms(r.get(p)) for p in ("round", "draft", "target_call", "forward"))
        print(
            f"{key:<14} {s['tokens_per_s']:>8.1f} {s['target_busy_fraction']:>6.2f} "
            f"{s['tau']:>6.2f} {s['ttft_median_s']:>7.2f} {_ms(s['itl_p50_ms']):>10} "
            f"{_ms(s['itl_p99_ms']):>10} {s.get('steps_per_round') or 0:>5.2f} "
            f"{s.get('cached_fraction') or 0:>6.2f}  {parts}"
        )
    print(f"wrote {config.out_dir}/serving.json and serving.png")
    return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def add_bench_load(sub) -> None:
    from distspec.bench.load_config import LoadConfig

    d = LoadConfig()
    p = sub.add_parser(
        "bench-load",
        help="hold N streaming clients against a server for a fixed time (throughput, "
        "latency percentiles, rejections, queue depth, RSS of every server process)",
    )
    p.add_argument(
        "--clients",
        type=positive_ints,
        default=d.clients,
        help="comma list of concurrency levels, run one after another (default 4,16,32)",
    )
    p.add_argument("--duration-s", type=float, default=d.duration_s, help="per level")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=d.max_new_tokens,
        help="tokens per request (default %(default)s)",
    )
    p.add_argument(
        "--temperature", type=float, default=d.temperature, help="0 = greedy (default %(default)s)"
    )
    p.add_argument(
        "--warmup-s",
        type=float,
        help="start of each level left out of the RSS growth (default min(10, duration/5))",
    )
    p.add_argument("--server", help="HOST:PORT of a running server (default: start one)")
    p.add_argument("--metrics", help="with --server: its Prometheus endpoint HOST:PORT")
    p.add_argument(
        "--server-pid", type=int, help="with --server: measure this local process and its children"
    )
    p.add_argument("--target", default=d.target, help="the started server's target")
    p.add_argument("--drafter", default=d.drafter, help="demo | ngram | PATH | none")
    p.add_argument(
        "--mode", choices=["ar", "sd", "pearl", "auto"], help="default: auto with a drafter"
    )
    p.add_argument(
        "--num-slots", type=int, default=d.num_slots, help="KV slots (with --server: its own)"
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=d.max_waiting,
        help="sessions queued beyond the slots (with --server: its own, for the check)",
    )
    p.add_argument(
        "--max-len",
        type=int,
        default=d.max_len,
        help="the started server's context length per session (default %(default)s)",
    )
    p.add_argument("--no-ray", dest="use_ray", action="store_false", help="workers in-process")
    p.add_argument(
        "--leak-limit-mb",
        type=float,
        default=d.leak_limit_mb,
        help="most RSS growth of all server processes within a level (after the warm-up)",
    )
    p.add_argument("--out", default=d.out_dir, help="directory for JSON and PNG")
    p.set_defaults(func=_bench_load)


def _bench_load(args: argparse.Namespace) -> int:
    from distspec.bench.load import format_table, run_load_bench
    from distspec.bench.load_config import LoadConfig

    config = LoadConfig(
        clients=args.clients,
        duration_s=args.duration_s,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        warmup_s=args.warmup_s,
        server=args.server,
        metrics=args.metrics,
        server_pid=args.server_pid,
        target=args.target,
        drafter=args.drafter,
        mode=args.mode,
        num_slots=args.num_slots,
        max_waiting=args.max_waiting,
        max_len=args.max_len,
        use_ray=args.use_ray,
        leak_limit_mb=args.leak_limit_mb,
        out_dir=args.out,
    )
    report = run_load_bench(config)
    print(format_table(report))
    print(f"wrote {config.out_dir}/load.json and load.png")
    return 0


def add_bench_chaos(sub) -> None:
    from distspec.bench.chaos_config import FAULT_KINDS, ChaosConfig

    d = ChaosConfig()
    p = sub.add_parser(
        "bench-chaos",
        help="hold N streaming clients against a server (run in this process on a local Ray "
        "cluster) while faults are injected on a schedule; per fault: completed, clear "
        "statuses, lost, wrong tokens, time until tokens flow again, p99 TTFT/ITL vs baseline",
    )
    p.add_argument(
        "--clients",
        type=int,
        default=d.clients,
        help="streaming clients, the edge ones included (default %(default)s)",
    )
    p.add_argument(
        "--edge-clients",
        type=int,
        default=d.edge_clients,
        help="of them: clients that draft locally and stream drafts over Speculate through a "
        "delaying relay (default %(default)s)",
    )
    p.add_argument(
        "--duration-s",
        type=float,
        default=d.duration_s,
        help="how long the clients run (default %(default)s)",
    )
    p.add_argument(
        "--faults",
        default=",".join(d.faults),
        help="comma list of fault kinds, injected round-robin: "
        + "; ".join(f"{k}: {v}" for k, v in FAULT_KINDS.items())
        + " (default %(default)s)",
    )
    p.add_argument(
        "--fault-interval-s",
        type=float,
        default=d.fault_interval_s,
        help="a fault every S seconds from S on, while one fits before the end; the first "
        "interval is the fault-free baseline, and a fault waits for the previous one to "
        "recover (default %(default)s)",
    )
    p.add_argument(
        "--settle-s",
        type=float,
        default=d.settle_s,
        help="a fault's window lasts until it recovered plus this (default %(default)s)",
    )
    p.add_argument(
        "--max-slip-s",
        type=float,
        default=d.max_slip_s,
        help="a fault still waiting for the previous one to recover at its slot moves the "
        "rest of the schedule and the end back, by this much at most (default %(default)s)",
    )
    p.add_argument(
        "--warmup-s",
        type=float,
        help="start of the run left out of the baseline (default min(10, interval/4))",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=d.max_new_tokens,
        help="tokens per (greedy) request (default %(default)s)",
    )
    p.add_argument(
        "--prompts", help="JSON file of prompts (default: the built-in benchmark prompts)"
    )
    p.add_argument("--num-prompts", type=int, help="use the first N prompts (default: all of them)")
    p.add_argument("--target", default=d.target, help="the target model (default %(default)s)")
    p.add_argument(
        "--target-tp",
        type=int,
        default=d.target_tp,
        help="target ranks; kill-target-rank needs 2 or more (default %(default)s)",
    )
    p.add_argument(
        "--drafter", default=d.drafter, help="the server's drafter model (default %(default)s)"
    )
    p.add_argument(
        "--edge-drafter", help="the edge clients' drafter (default: the same as --drafter)"
    )
    p.add_argument("--mode", choices=["sd", "pearl"], default=d.mode, help="default %(default)s")
    p.add_argument(
        "--num-slots", type=int, default=d.num_slots, help="KV slots (default %(default)s)"
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=d.max_waiting,
        help="sessions queued beyond the slots (default %(default)s)",
    )
    p.add_argument(
        "--max-len",
        type=int,
        default=d.max_len,
        help="context length per session (default %(default)s)",
    )
    p.add_argument(
        "--stall-timeout-s",
        type=float,
        default=d.stall_timeout_s,
        help="the server's stall timeout, which must end the stalled reader (default %(default)s)",
    )
    p.add_argument(
        "--edge-rtt-ms",
        type=float,
        default=d.edge_rtt_ms,
        help="round-trip time the relay adds for the edge clients (default %(default)s)",
    )
    p.add_argument(
        "--request-timeout-s",
        type=float,
        default=d.request_timeout_s,
        help="the clients' deadline: a request still open then hung and counts as lost "
        "(default %(default)s)",
    )
    p.add_argument("--out", default=d.out_dir, help="directory for JSON and PNG")
    p.set_defaults(func=_bench_chaos)


def _bench_chaos(args: argparse.Namespace) -> int:
    from distspec.bench.chaos_config import ChaosConfig

    config = ChaosConfig(
        clients=args.clients,
        edge_clients=args.edge_clients,
        duration_s=args.duration_s,
        faults=[f.strip() for f in args.faults.split(",") if f.strip()],
        fault_interval_s=args.fault_interval_s,
        settle_s=args.settle_s,
        max_slip_s=args.max_slip_s,
        warmup_s=args.warmup_s,
        max_new_tokens=args.max_new_tokens,
        prompts_file=args.prompts,
        num_prompts=args.num_prompts,
        target=args.target,
        target_tp=args.target_tp,
        drafter=args.drafter,
        edge_drafter=args.edge_drafter,
        mode=args.mode,
        num_slots=args.num_slots,
        max_waiting=args.max_waiting,
        max_len=args.max_len,
        stall_timeout_s=args.stall_timeout_s,
        edge_rtt_ms=args.edge_rtt_ms,
        request_timeout_s=args.request_timeout_s,
        out_dir=args.out,
    )
    from distspec.bench.chaos import format_table, run_chaos_bench

    report = run_chaos_bench(config)
    print(format_table(report))
    print(f"wrote {config.out_dir}/chaos.json and chaos.png")
    return 0 if report.ok else 1


def add_bench_edge(sub) -> None:
    p = sub.add_parser("bench-edge", help="benchmark an edge drafter across round-trip times")
    p.add_argument(
        "--target",
        default="demo",
        help="the target of the server the bench starts (demo | a model path; default demo)",
    )
    p.add_argument(
        "--drafter",
        default="demo",
        help="the edge drafter, run in this process (demo | ngram | a model path; default demo)",
    )
    p.add_argument("--rtts", default="0,20,50,100", help="comma list of round-trip times, ms")
    p.add_argument(
        "--num-prompts", type=int, default=6, help="first N benchmark prompts (default 6)"
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens per request (default %(default)s)"
    )
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per chunk (default 4)")
    p.add_argument("--out", default="bench-results", help="directory for JSON and PNG")
    p.set_defaults(func=_bench_edge)


def _bench_edge(args: argparse.Namespace) -> int:
    from distspec.bench.edge import EdgeBenchConfig, run_edge_bench

    config = EdgeBenchConfig(
        target=args.target,
        drafter=args.drafter,
        rtts_ms=[float(r) for r in args.rtts.split(",") if r.strip()],
        num_prompts=args.num_prompts,
        max_new_tokens=args.max_new_tokens,
        gamma=args.gamma,
        out_dir=args.out,
    )
    report = run_edge_bench(config)
    print(f"{'contender@rtt':<22} {'tok/s':>7} {'itl ms':>7} {'rtt ms':>7} {'hidden':>7}")
    for key, s in report["summary"].items():
        print(
            f"{key:<22} {s['tokens_per_s']:>7.1f} {s['itl_ms']:>7.1f} "
            f"{s['measured_rtt_ms']:>7.1f} {s['hidden_rtt_fraction']:>7.2f}"
        )
    print(f"wrote {config.out_dir}/edge.json and edge.png")
    return 0


def add_bench_easyspec(sub) -> None:
    p = sub.add_parser(
        "bench-easyspec",
        help="EasySpec: fuzzy vs exact top-1 agreement, and drafting step latency on ranks",
    )
    p.add_argument("--model", default="demo", help="the deep drafter to measure")
    p.add_argument("--groups", default="2,3,4,5", help="comma list of group sizes N")
    p.add_argument(
        "--exact",
        type=exact_layers,
        default=(1, 1),
        metavar="FIRST,LAST",
        help="first and last layers kept exact (default 1,1)",
    )
    p.add_argument("--parts", default="agreement,timing", help="agreement and/or timing")
    p.add_argument("--num-prompts", type=int, default=6, help="agreement: benchmark prompts")
    p.add_argument("--max-new-tokens", type=int, default=64, help="agreement: tokens each")
    p.add_argument("--ranks", type=int, default=2, help="timing: processes of the drafter group")
    p.add_argument("--repeats", type=int, default=5, help="timing: alternating repetitions")
    p.add_argument("--out", default="bench-results", help="directory for JSON and PNG")
    p.set_defaults(func=_bench_easyspec)


def _bench_easyspec(args: argparse.Namespace) -> int:
    from pathlib import Path

    from distspec.bench.easyspec import plot_easyspec, run_easyspec_bench
    from distspec.bench.easyspec_timing import run_easyspec_timing

    sizes = tuple(int(g) for g in args.groups.split(",") if g.strip())
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"agreement", "timing"}:
        raise ValueError(f"--parts takes agreement and/or timing, got {args.parts!r}")
    if any(g < 2 for g in sizes) or not sizes:
        raise ValueError(f"--groups needs sizes >= 2, got {args.groups!r}")
    if args.ranks < 2:
        raise ValueError(f"--ranks must be >= 2, got {args.ranks}")
    report: dict = {"model": args.model, "exact_layers": list(args.exact)}
    if "agreement" in parts:
        rows = run_easyspec_bench(
            args.model, sizes, args.num_prompts, args.max_new_tokens, args.exact
        )
        report["agreement"] = rows
        print(f"{'N':>3} {'groups':>6} {'calibrated':>11} {'uncalibrated':>13}")
        for r in rows:
            print(
                f"{r['group']:>3} {r['groups']:>6} {r['agreement_calibrated']:>11.3f} "
                f"{r['agreement_uncalibrated']:>13.3f}"
            )
    if "timing" in parts:
        timing = run_easyspec_timing(
            args.model, sizes, args.ranks, repeats=args.repeats, exact=args.exact
        )
        report["timing"] = timing
        sub = timing["sublayers_ms"]
        print(
            f"per layer: attention {sub['attn']:.3f} ms, MLP {sub['mlp']:.3f} ms; "
            f"embedding + head {sub['outside']:.2f} ms (one thread)"
        )
        print(
            f"{'N':>3} {'exact':>7} {'exact 1t':>9} {'fuzzy 1 rank':>13} "
            f"{f'fuzzy {args.ranks} ranks':>14} {'model':>7} {'gather':>7}   (ms per step)"
        )
        for r in timing["rows"]:
            print(
                f"{r['group']:>3} {r['exact_ms']:>7.2f} {r['exact_1thread_ms']:>9.2f} "
                f"{r['fuzzy_1rank_ms']:>13.2f} {r['fuzzy_ms']:>14.2f} "
                f"{r['model_fuzzy_ms']:>7.2f} {r['gather_ms']:>7.2f}"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "easyspec.json").write_text(json.dumps(report, indent=2))
    plot_easyspec(report, out / "easyspec.png")
    print(f"wrote {out}/easyspec.json and easyspec.png")
    return 0


def add_bench_kernels(sub) -> None:
    p = sub.add_parser(
        "bench-kernels",
        help="decode-shaped matmuls (1-16 rows) over a model's weight shapes: GB/s per kernel",
    )
    p.add_argument("--target", default="demo", help="the model whose weight shapes are used")
    p.add_argument("--rows", type=positive_ints, default=[1, 2, 5, 9, 16], help="rows of x")
    p.add_argument(
        "--kernels",
        default="skinny,onednn,blas,int8,int4,int4-x8",
        help="comma list of: skinny, onednn, blas, int8, int4, int4-x8",
    )
    p.add_argument("--repeats", type=int, default=7, help="alternating passes (default 7)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own)"
    )
    p.add_argument(
        "--steps",
        default="fp32,int4",
        help="also time the whole model's forward per row count, with the target's weights in"
        " each of these dtypes (fp32, int8, int4; empty: none)",
    )
    p.add_argument("--out", default="bench-results", help="directory for JSON and PNG")
    p.set_defaults(func=_bench_kernels)


def _bench_kernels(args: argparse.Namespace) -> int:
    from distspec.bench.kernels import (
        KernelBenchConfig,
        format_kernel_table,
        run_kernel_bench,
        write_kernel_report,
    )

    config = KernelBenchConfig(
        target=args.target,
        rows=list(args.rows),
        kernels=[k.strip() for k in args.kernels.split(",") if k.strip()],
        repeats=args.repeats,
        threads=args.threads,
        out=args.out,
        steps=[d.strip() for d in args.steps.split(",") if d.strip()],
    )
    report = run_kernel_bench(config)
    print(format_kernel_table(report))
    out = write_kernel_report(report, config.out)
    print(f"wrote {out / 'kernels.json'} and {out / 'kernels.png'}")
    return 0
