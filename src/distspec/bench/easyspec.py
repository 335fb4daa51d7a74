"""`distspec bench-easyspec`: how much fuzzy (EasySpec) drafting changes a deep drafter's
predictions, with and without KV calibration.

The drafter is a full model (the demo target itself: 30 layers). On the target's greedy
outputs for the benchmark prompts, teacher-forced, at each position the drafter predicts the
next token with one fuzzy step; agreement = how often that equals the exact model's
prediction. With calibration the K/V of earlier positions are exact (each is overwritten by
an exact step, as after a verify round); without, every step ever taken was fuzzy.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from distspec.datasets import load_prompts
from distspec.models.llama import easyspec_groups
from distspec.models.tokenizer import ChatMessage


def fuzzy_agreement(
    model, sequences: list[tuple[int, list[int]]], groups, calibrate: bool
) -> float:
    """sequences: (prompt length, prompt + output tokens). Fraction of output positions where
    a fuzzy step predicts the exact model's next token."""
    agree = total = 0
    slot = torch.tensor([0])
    for prompt_len, seq in sequences:
        tokens = torch.tensor([seq])
        pos = torch.arange(len(seq))[None]
        exact = model(tokens, pos, slot).argmax(-1)[0]  # exact predictions, all positions
        fuzzy_prefill = () if calibrate else groups
        model(tokens[:, :prompt_len], pos[:, :prompt_len], slot, fuzzy_groups=fuzzy_prefill)
        for p in range(prompt_len, len(seq)):
            step = model(tokens[:, p : p + 1], pos[:, p : p + 1], slot, fuzzy_groups=groups)
            agree += int(step[0, -1].argmax() == exact[p])
            total += 1
            if calibrate:  # the exact step overwrites the fuzzy K/V of position p
                model(tokens[:, p : p + 1], pos[:, p : p + 1], slot)
    return agree / total


def run_easyspec_bench(
    model_name: str = "demo",
    group_sizes: tuple[int, ...] = (2, 3, 4, 5),
    num_prompts: int = 6,
    new_tokens: int = 64,
    exact: tuple[int, int] = (1, 1),
) -> list[dict]:
    """exact: how many first and last layers stay exact."""
    from distspec.models.loader import load_for_inference
    from distspec.spec_decode.decoding import SpeculativeDecoder
    from distspec.spec_decode.sampling import SamplingParams

    loaded = load_for_inference(model_name, max_len=1024)
    model, tok = loaded.model, loaded.tokenizer
    sequences = []
    dec = SpeculativeDecoder(model, None, eos_token_ids=tok.eos_token_ids)
    for prompt in load_prompts(limit=num_prompts):
        ids = tok.encode_chat([ChatMessage("user", prompt)])
        out, _ = dec.generate(ids, SamplingParams(max_new_tokens=new_tokens))
        sequences.append((len(ids), ids + out))
    n = model.config.num_hidden_layers
    results = []
    for g in tqdm(group_sizes, desc="bench-easyspec"):
        groups = easyspec_groups(n, g, *exact)
        row = {"group": g, "groups": len(groups)}
        for calibrate in (True, False):
            key = "agreement_calibrated" if calibrate else "agreement_uncalibrated"
            row[key] = fuzzy_agreement(model, sequences, groups, calibrate)
        results.append(row)
    return results


def plot_easyspec(report: dict, path) -> None:
    """Agreement and step latency against the group size N (whichever parts the report has)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [key for key in ("agreement", "timing") if key in report]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        if key == "agreement":
            rows = report["agreement"]
            sizes = [r["group"] for r in rows]
            ax.plot(sizes, [r["agreement_calibrated"] for r in rows], "o-", label="calibrated")
            ax.plot(sizes, [r["agreement_uncalibrated"] for r in rows], "s--", label="uncalibrated")
            ax.set_ylabel("top-1 agreement with exact drafting")
            ax.set_ylim(0, 1.05)
        else:
            rows = report["timing"]["rows"]
            sizes = [r["group"] for r in rows]
            ranks = rows[0]["ranks"]
            series = [
                ("exact_ms", f"exact, 1 process x {ranks} threads", "k-"),
                ("exact_1thread_ms", "exact, 1 thread", "k:"),
                ("fuzzy_1rank_ms", "fuzzy, 1 rank", "o-"),
                ("fuzzy_ms", f"fuzzy, {ranks} ranks", "s-"),
                ("model_fuzzy_ms", f"model: fuzzy, {ranks} ranks", "s--"),
            ]
            for field, label, style in series:
                ax.plot(sizes, [r[field] for r in rows], style, label=label)
            ax.set_ylabel("ms per drafting step (median)")
            ax.set_ylim(bottom=0)
        ax.set_xlabel("layers per group N")
        ax.set_xticks(sizes)
        ax.legend(fontsize=8)
    fig.suptitle(f"EasySpec, drafter = {report.get('model', '?')} (30 layers), CPU", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
