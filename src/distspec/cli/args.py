"""What the commands share: the one-line-error parser, prompt and sampling flags, flag types."""

from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"distspec: error: {message}\n")


def add_prompt_and_sampling(p) -> None:
    p.add_argument("--prompt", required=True, help="user message (chat template applied)")
    p.add_argument("--raw", action="store_true", help="feed --prompt as is, no chat template")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=128,
        help="most tokens to generate (default %(default)s)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="nucleus sampling: keep the fewest most likely tokens whose probabilities reach P "
        "(1 = off)",
    )
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: a fresh one)")


TARGET_DTYPES = ("fp32", "int8", "int4")
TARGET_ACTIVATIONS = ("fp32", "int8")


def add_target_dtype(p, default: str | None = "fp32") -> None:
    p.add_argument(
        "--target-dtype",
        choices=TARGET_DTYPES,
        default=default,
        help="the target's linear weights: fp32, or weight-only int8/int4 in groups of 32 "
        "(a GGUF's own Q8_0/Q4_0/Q4_1 blocks where it has them; default fp32)",
    )
    p.add_argument(
        "--target-activations",
        choices=TARGET_ACTIVATIONS,
        default=default and "fp32",
        help="what an int8/int4 target's linears multiply: fp32 (the exact product with the "
        "dequantized weights; default) or int8 (x rounded per group of 32 first, as llama.cpp "
        "computes: faster, its own numerics)",
    )


def exact_layers(text: str) -> tuple[int, int]:
    try:
        first, last = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected FIRST,LAST (two integers), got {text!r}"
        ) from None
    return first, last


def sampling_params(args: argparse.Namespace):
    from distspec.spec_decode.sampling import SamplingParams

    if not args.prompt.strip():
        raise ValueError("the prompt is empty")
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


def positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma list of integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values
