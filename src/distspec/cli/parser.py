"""The one place that builds the parser: every command's flags, then its handler."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from distspec import __version__
from distspec.cli import bench, edge, generate, serve, train
from distspec.cli.args import Parser

COMMANDS: list[Callable] = [
    generate.add_generate,
    serve.add_serve,
    edge.add_edge,
    bench.add_bench,
    bench.add_bench_serve,
    bench.add_bench_load,
    bench.add_bench_chaos,
    bench.add_bench_edge,
    bench.add_bench_easyspec,
    bench.add_bench_kernels,
    train.add_train_drafter,
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="distspec", description="distributed speculative decoding")
    parser.add_argument("--version", action="version", version=f"distspec {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        parser_class=Parser,
        help="`distspec COMMAND -h` lists its flags",
    )
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"distspec: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
