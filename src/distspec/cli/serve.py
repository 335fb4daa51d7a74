"""`distspec serve`: the flags of the server (and its YAML keys)."""

from __future__ import annotations

import argparse

from distspec.cli.args import (
    add_target_dtype,
    exact_layers,
)


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve gRPC (distspec.v1.SpeculativeDecoding) from a Ray cluster"
    )
    p.add_argument("--config", help="YAML file of settings (flags override it)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    p.add_argument(
        "--http-port",
        type=int,
        help="also serve the OpenAI-compatible HTTP API (/v1/completions, "
        "/v1/chat/completions, /v1/models) on this port (0 picks a free one)",
    )
    p.add_argument("--host", help="interface to listen on (default all)")
    p.add_argument(
        "--address", help="Ray cluster to join (default: RAY_ADDRESS if set, else start one)"
    )
    p.add_argument(
        "--no-ray",
        dest="use_ray",
        action="store_const",
        const=False,
        help="run the workers in this process (tensor parallel size 1)",
    )
    p.add_argument("--target", help="demo | a model path (default demo)")
    add_target_dtype(p, default=None)
    p.add_argument("--target-tp", type=int, help="tensor-parallel ranks of the target")
    p.add_argument("--drafter", help="demo | ngram | a model path | none (default demo)")
    p.add_argument("--drafter-tp", type=int, help="ranks of each drafter group (default 1)")
    p.add_argument(
        "--drafter-parallel",
        choices=["tensor", "layer"],
        help="how a drafter group splits the drafter: tensor parallelism (default) or "
        "EasySpec's layer parallelism (needs --easyspec-group)",
    )
    p.add_argument(
        "--easyspec-group",
        type=int,
        metavar="N",
        help="EasySpec: draft with the attentions of each N middle layers sharing one input",
    )
    p.add_argument(
        "--easyspec-exact",
        type=exact_layers,
        metavar="FIRST,LAST",
        help="EasySpec: how many first and last drafter layers stay exact (default 1,1)",
    )
    p.add_argument("--num-drafters", type=int, help="drafter groups (sessions are spread)")
    p.add_argument(
        "--tree-width",
        type=int,
        metavar="W",
        help="drafters draft token trees of up to W children per node, sized per batch by "
        "measured verify costs (default 1: chains)",
    )
    p.add_argument(
        "--mode",
        choices=["ar", "sd", "pearl", "auto"],
        help="default: auto with a drafter (sd, pearl or plain rounds, whichever measures "
        "fastest at the current batch size), else ar",
    )
    p.add_argument("--gamma", type=int, help="longest draft per round (default 4)")
    p.add_argument("--num-slots", type=int, help="concurrent sessions (KV slots; default 16)")
    p.add_argument("--max-len", type=int, help="context length per session (default 2048)")
    p.add_argument("--max-waiting", type=int, help="sessions queued beyond the slots")
    p.add_argument(
        "--decode-steps",
        type=int,
        metavar="N",
        help="plain rounds decode up to N tokens a session per target call, as vLLM's "
        "multi-step scheduling (default 4; 1 while requests wait for a slot)",
    )
    p.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_const",
        const=False,
        help="prefill every prompt whole (default: a prompt reuses the K/V its slot holds of "
        "its start, the last prompt there; the scheduler picks the slot that holds most)",
    )
    p.add_argument("--device", help="cpu | cuda")
    p.add_argument("--threads", type=int, help="torch threads per worker")
    p.add_argument(
        "--target-cpus",
        type=float,
        help="CPUs per target rank (default on one machine: every core the drafters do not "
        "take; ranks are pinned to cores of their own where whole cores go round)",
    )
    p.add_argument("--drafter-cpus", type=float, help="CPUs per drafter rank (default 1)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument("--tls-cert", help="server certificate (PEM): serve TLS")
    p.add_argument("--tls-key", help="the certificate's private key (PEM)")
    p.add_argument("--tls-client-ca", help="mutual TLS: clients need a certificate from this CA")
    p.add_argument("--tokens-file", help="bearer tokens (one per line) the API then requires")
    p.add_argument("--max-sessions-per-client", type=int, help="open sessions per client")
    p.add_argument("--requests-per-minute", type=float, help="new sessions per client per minute")
    p.add_argument(
        "--request-timeout-s",
        type=float,
        metavar="S",
        help="end requests still running after S seconds, queueing included (default 0: never)",
    )
    p.add_argument(
        "--stall-timeout-s",
        type=float,
        metavar="S",
        help="end calls whose client sends no request or takes no response for S seconds "
        "(default 60; 0: never)",
    )
    p.add_argument(
        "--drain-timeout-s",
        type=float,
        metavar="S",
        help="on SIGTERM/SIGINT refuse new requests at once and give those in flight S seconds "
        "to finish before ending them with UNAVAILABLE; a second signal ends the drain "
        "(default 30)",
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:
        from distspec.server.serve import ServeConfig, serve
    except ImportError as e:
        raise RuntimeError(
            f"distspec serve needs the server extra (pip install 'distspec[server]'): {e}"
        ) from None

    values = {}
    if args.config:
        import yaml

        with open(args.config) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a mapping of settings")
        values = {k.replace("-", "_"): v for k, v in loaded.items()}
    skip = {"config", "func", "command", "verbose"}
    flags = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    serve(ServeConfig.from_dict({**values, **flags}))
    return 0
