"""`make gpu-check`: the engine on a CUDA device, in one run of a few minutes.

1. exactness: the fp32 target's greedy tokens equal transformers' on the same device and
   weights (the demo GGUF), prompt by prompt; bf16's agreement with transformers in bf16 is
   reported (different bf16 kernels may split near-ties);
2. quantized linears on the device (int4, int8) against the float64 product with their
   dequantized weight, within a stated tolerance;
3. AR tokens/s of fp32, bf16 and int4 targets, bf16 with and without CUDA graphs (whose
   greedy output must equal the eager steps'), and sd with the int4 target equals AR with it.

Exit status 1 when a check fails, 2 without a CUDA device. `--device cpu` runs the same
checks on the CPU (the test suite does, so the script works before a GPU is at hand).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import torch

PROMPTS = [
    "Give me three tips for staying focused while studying.",
    "Explain what a hash table is to a new programmer.",
    "Write a short poem about the sea.",
]
QUANT_TOL = 1e-4  # relative to the output's scale: fp32 accumulation of an exact product


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def hf_greedy(model_dir: Path, ids: list[int], n: int, device: str, dtype) -> list[int]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    x = torch.tensor([ids], device=device)
    with torch.inference_mode():
        out = hf.generate(x, max_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def engine(target: str, mode: str, device: str, dtype: str, target_dtype: str, max_len: int):
    from distspec.engine import Engine, EngineConfig

    cfg = EngineConfig(
        target=target, mode=mode, drafter="ngram", device=device, dtype=dtype,
        target_dtype=target_dtype, max_len=max_len,
    )  # fmt: skip
    return Engine(cfg)


def greedy(eng, ids: list[int], n: int) -> tuple[list[int], float]:
    """The new tokens (up to n, EOS included) and their decode tokens/s."""
    from distspec.spec_decode.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=n)
    sync(eng.target.model.device)
    start = time.perf_counter()
    out = eng.decoder.generate(ids, params)[0]
    sync(eng.target.model.device)
    return out, len(out) / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_exactness(target, prompts, n, device, max_len) -> list[Check]:
    from distspec.models.loader import resolve_model_dir

    model_dir = resolve_model_dir(target)
    checks = []
    for dtype, strict in (("float32", True), ("bfloat16", False)):
        eng = engine(target, "ar", device, dtype, "fp32", max_len)
        same = 0
        for ids in prompts:
            ours, _ = greedy(eng, ids, n)
            ref = hf_greedy(model_dir, ids, n, device, getattr(torch, dtype))
            k = min(len(ours), len(ref))  # the two may disagree on which tokens stop
            same += k > 0 and ours[:k] == ref[:k]
        ok = same == len(prompts) or not strict
        checks.append(Check(f"greedy {dtype} = transformers", ok, f"{same}/{len(prompts)}"))
        del eng
    return checks


def check_quantized(device: str) -> list[Check]:
    from distspec.models.linear import QuantLinear
    from distspec.models.quantized import quantize

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(384, 576, generator=g), torch.randn(5, 576, generator=g)
    checks = []
    for kind in ("int4", "int8"):
        q = quantize(w, kind)
        layer = QuantLinear(q).to(device)
        got = layer(x.to(device)).double().cpu()
        want = x.double() @ q.dequantize(torch.float64).T
        err = ((got - want).abs().max() / want.abs().max()).item()
        checks.append(Check(f"{kind} linear = dequantized matmul", err < QUANT_TOL, f"{err:.1e}"))
    return checks


# (activations, weights, steps from CUDA graphs)
SPEED_RUNS = (
    ("float32", "fp32", True),
    ("bfloat16", "fp32", False),
    ("bfloat16", "fp32", True),
    ("float32", "int4", True),
)


def measure_speed(target, prompts, n, device, max_len) -> tuple[list[Check], list[dict]]:
    rows, checks, eager_outs = [], [], None
    for dtype, target_dtype, graphs in SPEED_RUNS:
        with mock.patch.dict(os.environ, {"DISTSPEC_CUDA_GRAPHS": "1" if graphs else "0"}):
            eng = engine(target, "ar", device, dtype, target_dtype, max_len)
        greedy(eng, prompts[0], 8)  # warm-up (and the graphs' recording)
        speeds, outs = [], []
        for ids in prompts:
            out, tps = greedy(eng, ids, n)
            speeds.append(tps)
            outs.append(out)
        label = f"{target_dtype} {dtype}" + ("" if graphs else ", eager steps")
        rows.append({"target": label, "ar_tokens_per_s": statistics.median(speeds)})
        if dtype == "bfloat16" and not graphs:
            eager_outs = outs
        elif dtype == "bfloat16":
            same = sum(a == b for a, b in zip(outs, eager_outs, strict=True))
            ok, detail = same == len(prompts), f"{same}/{len(prompts)}"
            checks.append(Check("bf16 greedy, CUDA graph steps = eager steps", ok, detail))
        if target_dtype == "int4":
            sd = engine(target, "sd", device, dtype, target_dtype, max_len)
            pairs = zip(prompts, outs, strict=True)
            same = sum(greedy(sd, ids, n)[0] == out for ids, out in pairs)
            ok, detail = same == len(prompts), f"{same}/{len(prompts)}"
            checks.append(Check("sd int4 = ar int4", ok, detail))
        del eng
    return checks, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--target", default="demo")
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    p.add_argument("--prompts", type=int, default=len(PROMPTS))
    p.add_argument("--out", type=Path, help="write gpu-check.json here")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False)",
              file=sys.stderr)  # fmt: skip
        return 2
    from distspec.models.loader import load_tokenizer
    from distspec.models.tokenizer import ChatMessage

    tokenizer, _ = load_tokenizer(a.target)
    prompts = [tokenizer.encode_chat([ChatMessage("user", t)]) for t in PROMPTS[: a.prompts]]
    max_len = max(map(len, prompts)) + a.tokens + 16
    checks = check_exactness(a.target, prompts, a.tokens, a.device, max_len)
    checks += check_quantized(a.device)
    speed_checks, rows = measure_speed(a.target, prompts, a.tokens, a.device, max_len)
    checks += speed_checks
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    print(f"gpu-check on {name}, {a.target}, {len(prompts)} prompts x {a.tokens} greedy tokens")
    print("| check | result | detail |\n|---|---|---|")
    for c in checks:
        print(f"| {c.name} | {'ok' if c.ok else 'FAILED'} | {c.detail} |")
    print("\n| target | AR tokens/s |\n|---|---|")
    for r in rows:
        print(f"| {r['target']} | {r['ar_tokens_per_s']:.1f} |")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        report = {"device": name, "checks": [asdict(c) for c in checks], "speed": rows}
        (a.out / "gpu-check.json").write_text(json.dumps(report, indent=1))
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
