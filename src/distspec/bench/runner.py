"""`distspec bench`: contenders alternated over prompts and repetitions, in one process.

Each repetition runs every prompt through every contender, rotating the contender order per
prompt so slow drifts of a shared machine hit all contenders alike. Reported figures are
medians over repetitions of aggregate throughput (tokens / seconds over the prompt set).
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from distspec.bench import llama_cpp
from distspec.bench.contenders import (
    Contender,
    DistspecContender,
    HFContender,
    LlamaCppContender,
    distspec_decoder,
    load_hf_model,
)
from distspec.bench.plot import plot_bench
from distspec.datasets import load_conversations
from distspec.models.loader import gguf_source, load_for_inference
from distspec.models.tokenizer import ChatMessage
from distspec.spec_decode.defaults import BENCH_TREE_WIDTH, DEFAULT_GAMMA
from distspec.spec_decode.drafters.factory import build_drafter
from distspec.spec_decode.sampling import SamplingParams
from distspec.workers.placement import PinnedDrafter, split_cpus

log = logging.getLogger(__name__)

# ar-int8/ar-int4: distspec with the target's linears weight-only quantized (--target-dtype),
# fp32 activations; ar-int4-x8: the same with int8 activations (llama.cpp's numerics);
# llama.cpp-*: llama.cpp on the target's GGUF (make bench-peers builds it): plain decoding on an
# F32 copy, on the file as it is, and speculative (F32 target, the file itself as the draft).
LLAMA_CPP = ("llama.cpp-f32", "llama.cpp-native", "llama.cpp-sd")
QUANT_AR = ("ar-int8", "ar-int4", "ar-int8-x8", "ar-int4-x8")
# sd-self*: a quantized copy of the target drafts (models/self_draft.py); -model: no lookup
SELF_SD = ("sd-self", "sd-self-int4", "sd-self-int8", "sd-self-bf16", "sd-self-model")
# the same drafters with PEARL, or with the mode `generate` picks by default (auto: sd or
# pearl, measured at start-up)
OTHER_MODES = ("pearl-self", "pearl-self-model", "auto-self", "pearl-demo", "auto-demo")
# model-free drafters beside prompt lookup (sd-ngram): suffix decoding, Token Recycling
MODEL_FREE_SD = ("sd-suffix", "sd-recycle")
PINNED = "+pin"  # a speculative contender's suffix: its drafter on a core of its own
TREE = "-tree"  # ... and a drafter's: token trees of width BENCH_TREE_WIDTH (sd-self-tree)
KNOWN = (
    "hf-ar",
    "hf-lookup",
    "ar",
    *QUANT_AR,
    *SELF_SD,
    *OTHER_MODES,
    "sd-ngram",
    *MODEL_FREE_SD,
    "sd-demo",
    "sd-demo-model",
    *LLAMA_CPP,
)
TREE_OK = (
    "sd-self",
    "sd-self-int4",
    "sd-self-int8",
    "sd-self-bf16",
    "sd-self-model",
    *MODEL_FREE_SD,
    "sd-demo",
    "sd-demo-model",
)


@dataclass
class BenchConfig:
    target: str = "demo"
    contenders: list[str] = field(
        default_factory=lambda: ["hf-ar", "hf-lookup", "ar", "sd-ngram", "sd-demo", "sd-self"]
    )
    prompts_file: str | None = None
    num_prompts: int | None = None
    max_new_tokens: int = 128
    repeats: int = 3
    gamma: int = DEFAULT_GAMMA
    adaptive: bool = True
    lookup_tokens: int = 5
    temperature: float = 0.0
    seed: int = 0
    threads: int | None = None
    # > 0: speculative contenders pin drafter and target apart (a contender named NAME+pin
    # does so on its own, on 1 core if this is 0)
    drafter_cpus: int = 0
    prefix_cache: bool = True  # a prompt reuses what its contender's KV slot holds of it
    out_dir: str = "bench-results"

    def __post_init__(self) -> None:
        for c in self.contenders:
            c = c.removesuffix(PINNED)
            if c.endswith(TREE) and c.removesuffix(TREE) not in TREE_OK:
                raise ValueError(f"{c}: trees for {', '.join(TREE_OK)}")
            c = c.removesuffix(TREE)
            if c not in KNOWN and not c.startswith(("sd:", "sd-model:")):
                raise ValueError(
                    f"unknown contender {c!r}; known: {', '.join(KNOWN)}, sd:PATH, sd-model:PATH"
                )
        if not self.contenders:
            raise ValueError("no contenders given")
        if set(self.contenders) & set(LLAMA_CPP):
            if gguf_source(self.target) is None:
                raise ValueError("llama.cpp contenders need a GGUF target (demo or a .gguf file)")
            if llama_cpp.tool("llama-completion") is None:
                raise ValueError("llama.cpp is not built: run `make bench-peers` first")
            if self.temperature != 0:
                raise ValueError("llama.cpp contenders run greedy only (--temperature 0)")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")


def build_contenders(config: BenchConfig, target) -> list[Contender]:
    out: list[Contender] = []
    hf_model = None
    eos = target.tokenizer.eos_token_ids
    threads = config.threads or torch.get_num_threads()
    for slot, name in enumerate(config.contenders):  # each its own KV slot of target's
        if name.startswith("hf-"):
            hf_model = hf_model or load_hf_model(config.target)
            lookup = config.lookup_tokens if name == "hf-lookup" else 0
            out.append(HFContender(name, hf_model, eos, lookup))
        elif name == "ar":
            decoder = distspec_decoder(target, None, config.gamma, config.adaptive, slot=slot)
            out.append(DistspecContender(name, decoder))
        elif name in QUANT_AR:
            weights, _, x8 = name[3:].partition("-")
            activations = "int8" if x8 else "fp32"
            quant = load_for_inference(
                config.target, weight_dtype=weights, quant_activations=activations
            )
            decoder = distspec_decoder(quant, None, config.gamma, config.adaptive)
            out.append(DistspecContender(name, decoder))
        elif name in LLAMA_CPP:
            gguf = gguf_source(config.target)
            model = gguf if name == "llama.cpp-native" else llama_cpp.f32_gguf(gguf)
            draft = gguf if name == "llama.cpp-sd" else None
            draft_max = min(16, 2 * config.gamma)
            runner = llama_cpp.LlamaCpp(model, threads, draft, draft_max=draft_max)
            out.append(LlamaCppContender(name, runner, target.tokenizer))
        else:
            base = name.removesuffix(PINNED)
            width = BENCH_TREE_WIDTH if base.endswith(TREE) else 1
            mode, drafter_name, lookup = _drafter_of(base.removesuffix(TREE))
            # sequential rounds in slot 0: a copy of the target reads its verified K/V (not
            # under PEARL: make_decoder turns it off)
            drafter = build_drafter(
                drafter_name,
                target,
                target.model.max_len,
                lookup,
                target_kv_slot=slot,
                tree_width=width,
            )
            pinned = config.drafter_cpus or (1 if name.endswith(PINNED) else 0)
            placement = split_cpus(pinned) if pinned else None
            if placement is not None:
                drafter = PinnedDrafter(drafter, placement.drafter)
            with nullcontext() if placement is None else placement.on_target():
                decoder = distspec_decoder(
                    target, drafter, config.gamma, config.adaptive, mode, width > 1, slot
                )
            out.append(DistspecContender(name, decoder, placement))
    return out


def _drafter_of(contender: str) -> tuple[str, str, bool]:
    """(mode, drafter name, prompt lookup on) of a speculative contender: sd-demo,
    sd-demo-model, pearl-self, auto-self, sd:PATH, sd-model:PATH."""
    if ":" in contender:
        kind, name = contender.split(":", 1)
        return "sd", name, kind == "sd"
    mode, name = contender.split("-", 1)
    if name.endswith("-model"):
        return mode, name[: -len("-model")], False
    return mode, name, True


def run_bench(config: BenchConfig) -> dict:
    if config.threads:
        torch.set_num_threads(config.threads)
    prompts = load_conversations(config.prompts_file, config.num_prompts)
    # a KV slot per contender: each reuses what its own last request left there, as a
    # server of its own would (models/prefix_cache.py)
    target = load_for_inference(config.target, num_slots=len(config.contenders))
    prompt_ids = [
        target.tokenizer.encode_chat([ChatMessage(m["role"], m["content"]) for m in chat])
        for chat in prompts
    ]
    contenders = build_contenders(config, target)
    for c in contenders:
        if isinstance(c, DistspecContender):
            c.use_prefix_cache(config.prefix_cache)

    def params(i: int) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            seed=config.seed + i,
        )

    for c in contenders:  # warm-up: first calls pay allocator and kernel set-up costs
        c.run(
            prompt_ids[0], SamplingParams(max_new_tokens=8, temperature=config.temperature, seed=0)
        )
    records: list[dict] = []
    total = config.repeats * len(prompts) * len(contenders)
    with tqdm(total=total, desc="bench", unit="run") as bar:
        for rep in range(config.repeats):
            for c in contenders:  # each repetition is the workload afresh (suffix, recycle)
                c.forget()
            for i, ids in enumerate(prompt_ids):
                k = (rep * len(prompts) + i) % len(contenders)
                for c in contenders[k:] + contenders[:k]:
                    bar.set_postfix_str(f"{c.name} prompt {i}")
                    r = c.run(ids, params(i))
                    r.text = r.text if r.text is not None else target.tokenizer.decode(r.token_ids)
                    records.append({"contender": c.name, "repeat": rep, "prompt": i, **asdict(r)})
                    bar.update()
    summary = summarize(records, [c.name for c in contenders], config.temperature == 0)
    result = {
        "config": asdict(config),
        "machine": machine_info(),
        "num_prompts": len(prompts),
        "summary": summary,
        "records": records,
    }
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    plot_bench(summary, out / "bench.png", title=bench_title(config, len(prompts)))
    print(format_table(summary))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return result


def summarize(records: list[dict], names: list[str], greedy: bool) -> dict[str, dict]:
    summary: dict[str, dict] = {}
    reference = _outputs(records, names[0])
    for name in names:
        rows = [r for r in records if r["contender"] == name]
        reps = sorted({r["repeat"] for r in rows})
        tps = []
        for rep in reps:
            rr = [r for r in rows if r["repeat"] == rep]
            tps.append(sum(_tokens(r) for r in rr) / sum(r["wall_s"] for r in rr))
        s: dict = {
            "tokens_per_s": statistics.median(tps),
            "tokens_per_s_runs": tps,
            "new_tokens": sum(_tokens(r) for r in rows) / len(reps),
        }
        if all(r.get("ttft_s") is not None for r in rows):
            # decoding alone, after the first token: the prompt's prefill is the same work
            # for every contender (llama.cpp reports its eval rate so too)
            s["decode_tokens_per_s"] = statistics.median(
                sum(_tokens(r) - 1 for r in rr) / sum(r["wall_s"] - r["ttft_s"] for r in rr)
                for rr in ([r for r in rows if r["repeat"] == rep] for rep in reps)
            )
        if rows[0]["target_forwards"] is not None:
            fwd = sum(r["target_forwards"] for r in rows)
            drafted = sum(r["draft_tokens"] for r in rows)
            s["tokens_per_target_forward"] = sum(_tokens(r) for r in rows) / fwd
            s["acceptance_rate"] = (
                sum(r["accepted_tokens"] for r in rows) / drafted if drafted else None
            )
            # where a round's time goes: drafting, target forwards, and the share of the
            # wall time the target computes (PEARL overlaps the first with the second)
            wall = sum(r["wall_s"] for r in rows)
            s["draft_ms_per_round"] = 1e3 * sum(r["draft_s"] for r in rows) / fwd
            s["verify_ms_per_round"] = 1e3 * sum(r["verify_s"] for r in rows) / fwd
            s["wall_ms_per_round"] = 1e3 * wall / fwd
            s["target_busy"] = sum(r["verify_s"] for r in rows) / wall
        elif rows[0]["draft_tokens"] is not None:  # llama.cpp's speculative mode
            drafted = sum(r["draft_tokens"] for r in rows)
            s["acceptance_rate"] = sum(r["accepted_tokens"] for r in rows) / drafted
        if greedy:
            outputs = _outputs(records, name)
            s["same_output_as_" + names[0]] = outputs == reference
            s["prompts_same_as_" + names[0]] = sum(
                outputs[k] == reference.get(k) for k in outputs
            ) / len(outputs)
        summary[name] = s
    base = summary[names[0]]["tokens_per_s"]
    for s in summary.values():
        s["speedup_vs_" + names[0]] = s["tokens_per_s"] / base
    return summary


def _tokens(record: dict) -> int:
    n = record.get("num_tokens")
    return len(record["token_ids"]) if n is None else n


def _outputs(records: list[dict], name: str) -> dict:
    """Each run's output text (token ids for distspec and transformers; llama.cpp's text)."""
    return {
        (r["repeat"], r["prompt"]): r["text"].rstrip() for r in records if r["contender"] == name
    }


def format_table(summary: dict[str, dict]) -> str:
    base = next(iter(summary))
    lines = [
        f"| contender | tokens/s (median) | speedup vs {base} | decode tokens/s | tau "
        "| acceptance | same output | ms per round: draft / verify / wall | target busy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base_decode = summary[base].get("decode_tokens_per_s")
    for name, s in summary.items():
        tau = s.get("tokens_per_target_forward")
        acc = s.get("acceptance_rate")
        same = s.get("same_output_as_" + base)
        rounds, busy = "-", "-"
        if "target_busy" in s:
            rounds = " / ".join(
                f"{s[k + '_ms_per_round']:.1f}" for k in ("draft", "verify", "wall")
            )
            busy = f"{s['target_busy']:.2f}"
        decode = s.get("decode_tokens_per_s")
        if decode is None:
            decoding = "-"
        elif base_decode:
            decoding = f"{decode:.1f} ({decode / base_decode:.2f}x)"
        else:
            decoding = f"{decode:.1f}"
        lines.append(
            f"| {name} | {s['tokens_per_s']:.1f} | {s['speedup_vs_' + base]:.2f}x | {decoding} | "
            f"{'-' if tau is None else f'{tau:.2f}'} | {'-' if acc is None else f'{acc:.2f}'} | "
            f"{'-' if same is None else ('yes' if same else 'NO')} | {rounds} | {busy} |"
        )
    return "\n".join(lines)


def machine_info() -> dict:
    import os

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def bench_title(config: BenchConfig, n: int) -> str:
    mode = "greedy" if config.temperature == 0 else f"T={config.temperature}"
    return (
        f"{config.target}: {n} prompts x {config.max_new_tokens} new tokens, {mode}, "
        f"median of {config.repeats}"
    )
