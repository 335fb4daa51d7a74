"""`distspec generate`: one prompt through the local engine."""

from __future__ import annotations

import argparse
import json
import sys

from distspec.cli.args import (
    add_prompt_and_sampling,
    add_target_dtype,
    exact_layers,
    sampling_params,
)
from distspec.spec_decode.defaults import DEFAULT_DRAFTER, DEFAULT_GAMMA, DRAFTER_HELP


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    add_prompt_and_sampling(p)
    p.add_argument(
        "--mode",
        choices=["ar", "sd", "pearl", "auto"],
        default="auto",
        help="ar: plain decoding; sd: draft then verify; pearl: draft while verifying (PEARL); "
        "auto (default): sd or pearl, whichever overlapping a draft with a verify measured at "
        "start-up favours",
    )
    p.add_argument(
        "--drafter",
        default=DEFAULT_DRAFTER,
        help=f"{DRAFTER_HELP} (default {DEFAULT_DRAFTER}: a quantized copy of the target)",
    )
    p.add_argument(
        "--gamma", type=int, default=DEFAULT_GAMMA, help="draft tokens per round (the most)"
    )
    p.add_argument(
        "--adaptive",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="adapt the draft length to measured costs and acceptance (off: always --gamma)",
    )
    p.add_argument(
        "--lookup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="model drafters start drafts with prompt-lookup matches of 2+ tokens",
    )
    p.add_argument(
        "--easyspec-group",
        type=int,
        default=0,
        metavar="N",
        help="EasySpec: draft with the attentions of each N middle layers sharing one input",
    )
    p.add_argument(
        "--easyspec-exact",
        type=exact_layers,
        default=(1, 1),
        metavar="FIRST,LAST",
        help="EasySpec: how many first and last drafter layers stay exact (default 1,1)",
    )
    p.add_argument(
        "--drafter-parallel",
        choices=["layer"],
        default=None,
        help="layer: run each EasySpec group's attentions on --drafter-ranks processes",
    )
    p.add_argument("--drafter-ranks", type=int, default=2, help="with --drafter-parallel layer")
    p.add_argument("--target", default="demo", help="demo | PATH (HF dir or .gguf)")
    add_target_dtype(p)
    p.add_argument("--max-len", type=int, default=4096, help="KV cache length (context)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--drafter-cpus",
        type=int,
        default=0,
        metavar="N",
        help="pin the drafter to the last N cores and the target to the others, so drafting "
        "and verifying (PEARL) run at once (default 0: both use every core, in turn)",
    )
    p.add_argument(
        "--tree-width",
        type=int,
        default=1,
        metavar="W",
        help="draft token trees with up to W children per node, verified in one target forward "
        "(model drafters: their next W-1 choices beside each token; suffix: the most frequent "
        "continuations; recycle: the target's own top candidates); default 1: chains",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from distspec.engine import Engine, EngineConfig

    params = sampling_params(args)
    if args.drafter_parallel == "layer" and not args.easyspec_group:
        raise ValueError("--drafter-parallel layer needs --easyspec-group N (N >= 2)")
    config = EngineConfig(
        target=args.target,
        mode=args.mode,
        drafter=args.drafter,
        gamma=args.gamma,
        adaptive=args.adaptive,
        lookup=args.lookup,
        max_len=args.max_len,
        target_dtype=args.target_dtype,
        target_activations=args.target_activations,
        threads=args.threads,
        easyspec_group=args.easyspec_group,
        easyspec_exact=args.easyspec_exact,
        drafter_ranks=args.drafter_ranks if args.drafter_parallel == "layer" else 1,
        drafter_cpus=args.drafter_cpus,
        tree_width=args.tree_width,
    )
    engine = Engine(config)
    try:
        return _stream_generation(args, engine, params)
    finally:
        engine.close()


def _stream_generation(args: argparse.Namespace, engine, params) -> int:
    prompt_ids = engine.encode(args.prompt, raw=args.raw)
    token_ids: list[int] = []
    text = ""
    for delta, step in engine.stream_text(prompt_ids, params):
        token_ids += step.token_ids
        text += delta
        if not args.json:
            sys.stdout.write(delta)
            sys.stdout.flush()
    if args.json:
        result = {
            "text": engine.tokenizer.decode(token_ids),
            "token_ids": token_ids,
            "finish_reason": step.finish_reason,
            "mode": engine.mode,
            "drafter": args.drafter if engine.mode != "ar" else None,
            "placement": None if engine.placement is None else str(engine.placement),
            "stats": step.stats.to_dict(),
        }
        print(json.dumps(result))
    else:
        sys.stdout.write("\n")
        summary = summary_line(step.stats, engine.mode, args.drafter, engine.placement)
        print(summary, file=sys.stderr)
    return 0


def summary_line(stats, mode: str, drafter: str, placement=None) -> str:
    """What decoding did, in one line (as llama.cpp ends with its timings)."""
    line = f"{stats.new_tokens} tokens in {stats.wall_s:.2f} s, {stats.tokens_per_s:.1f} tokens/s"
    if mode == "ar":
        return f"{line}; mode ar"
    line = (
        f"{line}; mode {mode}, drafter {drafter}: tau {stats.tokens_per_target_forward:.2f} "
        f"tokens per target forward, {stats.acceptance_rate:.0%} of "
        f"{stats.draft_tokens} draft tokens accepted"
    )
    return line if placement is None else f"{line}; {placement}"
