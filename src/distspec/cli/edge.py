"""`distspec edge`: draft on this device for a remote server."""

from __future__ import annotations

import argparse
import json
import sys

from distspec.cli.args import (
    add_prompt_and_sampling,
    sampling_params,
)
from distspec.spec_decode.defaults import DRAFTER_HELP


def add_edge(sub) -> None:
    p = sub.add_parser("edge", help="draft on this device; the server's target verifies")
    p.add_argument("--server", required=True, help="HOST:PORT of a distspec server")
    add_prompt_and_sampling(p)
    p.add_argument(
        "--drafter",
        default="demo",
        help=f"{DRAFTER_HELP} (default demo; self: a quantized copy of --target, built here)",
    )
    p.add_argument(
        "--target",
        default="demo",
        help="the server's target: its tokenizer (and embedding, or with --drafter self the "
        "whole model file, checked by the server against its own)",
    )
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per chunk")
    p.add_argument(
        "--overlap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="draft the next chunk while one is verified (--no-overlap: stop and wait)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--tls-ca", help="connect with TLS, trusting this CA certificate (PEM)")
    p.add_argument("--tls-cert", help="this client's certificate, for mutual TLS (PEM)")
    p.add_argument("--tls-key", help="this client's private key, for mutual TLS (PEM)")
    p.add_argument("--token", help="bearer token for a server that requires one")
    p.set_defaults(func=_edge)


def _edge(args: argparse.Namespace) -> int:
    import grpc

    from distspec.edge_client import EdgeClient
    from distspec.models.identity import model_identity
    from distspec.models.self_draft import self_form
    from distspec.spec_decode.drafters.factory import load_drafter, new_drafter

    params = sampling_params(args)
    loaded = load_drafter(args.drafter, args.target, max_len=4096)
    identity = None
    if loaded is not None:  # a model drafter: the server checks it fits its target
        copy = self_form(args.drafter) is not None
        vocab = loaded.model.config.vocab_size
        identity = model_identity(args.target, loaded.tokenizer, vocab, weights=copy)
    drafter = new_drafter(loaded, name=args.drafter)
    client = EdgeClient(
        args.server,
        drafter,
        gamma=args.gamma,
        overlap=args.overlap,
        tls_ca=args.tls_ca,
        token=args.token,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        drafter_model=identity,
    )
    prompt = {"prompt": args.prompt} if args.raw else {"messages": [("user", args.prompt)]}
    token_ids, text = [], ""
    try:
        for step in client.generate(params, **prompt):
            token_ids += step.token_ids
            text += step.text
            if not args.json:
                sys.stdout.write(step.text)
                sys.stdout.flush()
    except grpc.RpcError as e:
        raise RuntimeError(f"server {args.server}: {e.code().name}: {e.details()}") from None
    finally:
        client.close()
    if args.json:
        result = {
            "text": text,
            "token_ids": token_ids,
            "finish_reason": step.finish_reason,
            "overlap": args.overlap,
            "stats": step.stats.to_dict(),
        }
        print(json.dumps(result))
    else:
        sys.stdout.write("\n")
    return 0
