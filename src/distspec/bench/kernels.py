"""`distspec bench-kernels`: decode-shaped matmuls (1-16 rows) over a model's real weight
shapes, per kernel: GB/s of weights streamed, against the machine's read bandwidth.

Every pass multiplies x by each weight matrix of the model once (per layer: fused QKV, output,
fused gate/up, down; then the head), so the weights (538 MB for the demo model) come from
memory, not cache, as in a decode step. Kernels alternate pass by pass; medians reported.

Then the whole model as the engine serves it (`--steps fp32,int4`): one forward of `rows`
tokens after a context, every row's logits, as a verify chunk of rows - 1 drafts costs.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from distspec.models.config import ModelConfig
from distspec.models.cpu_kernels import kernels
from distspec.models.linear import PackedLinear, QuantLinear, SkinnyLinear
from distspec.models.loader import WEIGHT_DTYPES, load_model, resolve_model_dir
from distspec.models.quantized import quantize
from distspec.spec_decode.draft_policy import dummy_context, target_forward, timed_together

KERNELS = ("skinny", "onednn", "blas", "int8", "int4", "int4-x8")
KERNEL_LABELS = {
    "skinny": "distspec skinny_linear (SkinnyLinear)",
    "onednn": "oneDNN pre-packed (PackedLinear)",
    "blas": "F.linear (BLAS)",
    "int8": "distspec q8_linear, fp32 x (QuantLinear int8)",
    "int4": "distspec q4_linear, fp32 x (QuantLinear int4)",
    "int4-x8": "distspec q4_linear, int8 x",
}


@dataclass
class KernelBenchConfig:
    target: str = "demo"
    rows: list[int] = field(default_factory=lambda: [1, 2, 5, 9, 16])
    kernels: list[str] = field(default_factory=lambda: list(KERNELS))
    repeats: int = 7
    threads: int | None = None
    out: str = "bench-results"
    steps: list[str] = field(default_factory=lambda: ["fp32", "int4"])  # target weight dtypes
    step_context: int = 200  # tokens in the KV cache before the timed forward

    def __post_init__(self) -> None:
        unknown = [k for k in self.kernels if k not in KERNELS]
        if unknown:
            raise ValueError(f"unknown kernel(s) {', '.join(unknown)}; known: {', '.join(KERNELS)}")
        if not self.rows or min(self.rows) < 1 or max(self.rows) > 16:
            raise ValueError("rows must be between 1 and 16")
        if self.repeats < 1:
            raise ValueError("repeats must be at least 1")
        unknown = [d for d in self.steps if d not in WEIGHT_DTYPES]
        if unknown:
            known = ", ".join(WEIGHT_DTYPES)
            raise ValueError(f"unknown step dtype(s) {', '.join(unknown)}; known: {known}")


def weight_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """[out, in] of every matrix a decode step multiplies by (TP 1)."""
    hd, h = config.head_dim, config.hidden_size
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * hd
    layer = [(qkv, h), (config.num_attention_heads * hd, h), (2 * config.intermediate_size, h)]
    layer.append((h, config.intermediate_size))
    return layer * config.num_hidden_layers + [(config.vocab_size, h)]


def read_bandwidth_gbs(mb: int = 512, repeats: int = 7) -> float:
    """The machine's read bandwidth with torch's threads: a sum over an mb-MB tensor."""
    x = torch.ones(mb * (1 << 20) // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times) / 1e9


def _layers(name: str, weights: list[torch.Tensor]) -> list[nn.Module]:
    """The layers the engine runs (models/linear.py), one per weight."""
    plain = []
    for w in weights:
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(w, requires_grad=False)
        plain.append(linear)
    if name == "skinny":
        ops = kernels()
        if ops is None:
            raise RuntimeError("distspec's CPU kernels are not available on this machine")
        return [SkinnyLinear(linear, ops) for linear in plain]
    if name == "onednn":
        return [PackedLinear(linear) for linear in plain]
    if name.startswith("int"):
        dtype, _, x8 = name.partition("-")
        return [QuantLinear(quantize(w, dtype), int8_activations=bool(x8)) for w in weights]
    return plain  # nn.Linear: F.linear, BLAS


def _bytes(layer: nn.Module, weight: torch.Tensor) -> int:
    if isinstance(layer, QuantLinear):
        return sum(b.numel() * b.element_size() for b in layer.buffers())
    return weight.numel() * weight.element_size()


def run_kernel_bench(config: KernelBenchConfig) -> dict:
    if config.threads:
        torch.set_num_threads(config.threads)
    model_config = ModelConfig.from_json_file(resolve_model_dir(config.target) / "config.json")
    shapes = weight_shapes(model_config)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=g) * 0.02 for n, k in shapes]
    weight_bytes = sum(w.numel() * 4 for w in weights)
    bandwidth = read_bandwidth_gbs()
    fns = {name: _layers(name, weights) for name in config.kernels}
    kernel_bytes = {
        name: sum(_bytes(layer, w) for layer, w in zip(layers, weights, strict=True))
        for name, layers in fns.items()
    }
    times: dict[tuple[str, int], list[float]] = {(k, r): [] for k in fns for r in config.rows}
    steps = config.repeats * len(config.rows) * len(fns)
    with tqdm(total=steps, desc="bench-kernels", unit="pass") as bar:
        for _ in range(config.repeats):
            for rows in config.rows:
                xs = {k: torch.randn(rows, k, generator=g) for k in {k for _, k in shapes}}
                for name, layers in fns.items():  # alternating: drift hits every kernel alike
                    t = time.perf_counter()
                    for layer, (_, k) in zip(layers, shapes, strict=True):
                        layer(xs[k])
                    times[name, rows].append(time.perf_counter() - t)
                    bar.update()
    results = []
    for name in fns:
        one = statistics.median(times[name, min(config.rows)])
        for rows in config.rows:
            s = statistics.median(times[name, rows])
            gbs = kernel_bytes[name] / s / 1e9
            results.append(
                {
                    "kernel": name,
                    "rows": rows,
                    "weight_mb": kernel_bytes[name] / 1e6,
                    "pass_ms": s * 1e3,
                    "gb_per_s": gbs,
                    "of_bandwidth": gbs / bandwidth,
                    "cost_vs_fewest_rows": s / one,
                }
            )
    return {
        "config": asdict(config),
        "threads": torch.get_num_threads(),
        "matrices": len(shapes),
        "weight_mb": weight_bytes / 1e6,
        "read_bandwidth_gbs": bandwidth,
        "results": results,
        "steps": [r for dtype in config.steps for r in model_step_times(config, dtype)],
    }


def model_step_times(config: KernelBenchConfig, weight_dtype: str) -> list[dict]:
    """The served target's forward of each row count after step_context tokens, all logits;
    row counts alternate round by round (3x the kernels' repeats: one step is short)."""
    max_len = config.step_context + max(config.rows) + 1
    model = load_model(config.target, weight_dtype=weight_dtype, max_len=max_len).model
    context = dummy_context(model.config.vocab_size, config.step_context)
    runs = [target_forward(model, context, n, prefill=i == 0) for i, n in enumerate(config.rows)]
    seconds = timed_together(runs, 3 * config.repeats)
    one = seconds[0]
    return [
        {"dtype": weight_dtype, "rows": n, "step_ms": s * 1e3, "cost_vs_fewest_rows": s / one}
        for n, s in zip(config.rows, seconds, strict=True)
    ]


def format_kernel_table(report: dict) -> str:
    lines = [
        f"{report['matrices']} matrices, {report['weight_mb']:.0f} MB of fp32 weights "
        "(quantized: fewer, column MB), "
        f"{report['threads']} threads; machine read bandwidth {report['read_bandwidth_gbs']:.1f}"
        " GB/s",
        "",
        "| kernel | MB | rows | pass ms | GB/s | of bandwidth | cost vs 1 row |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['kernel']} | {r['weight_mb']:.0f} | {r['rows']} | {r['pass_ms']:.1f} | "
            f"{r['gb_per_s']:.1f} | "
            f"{r['of_bandwidth']:.0%} | {r['cost_vs_fewest_rows']:.2f} |"
        )
    if report["steps"]:
        context = report["config"]["step_context"]
        lines += [
            "",
            f"The whole model, one forward after {context} tokens, every row's logits:",
            "",
            "| target weights | rows | step ms | cost vs 1 row |",
            "|---|---|---|---|",
        ]
        for r in report["steps"]:
            lines.append(
                f"| {r['dtype']} | {r['rows']} | {r['step_ms']:.1f} | "
                f"{r['cost_vs_fewest_rows']:.2f} |"
            )
    return "\n".join(lines)


def plot_kernels(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, cost) = plt.subplots(1, 2, figsize=(11, 4), width_ratios=(3, 2))
    for name in report["config"]["kernels"]:
        rows = [r for r in report["results"] if r["kernel"] == name]
        ax.plot(
            [r["rows"] for r in rows],
            [r["gb_per_s"] for r in rows],
            "o-",
            label=KERNEL_LABELS[name],
        )
        cost.plot([r["rows"] for r in rows], [r["cost_vs_fewest_rows"] for r in rows], "o-")
    bw = report["read_bandwidth_gbs"]
    ax.axhline(bw, color="#777777", ls="--", lw=1, label=f"read bandwidth {bw:.1f} GB/s")
    ax.axhline(0.75 * bw, color="#bbbbbb", ls=":", lw=1, label="75% of it")
    ax.set_xlabel("rows of x (decode step = 1, verify chunk = k + 1)")
    ax.set_ylabel("weights streamed, GB/s (median)")
    ax.set_title(
        f"decode-shaped matmuls over the model's {report['matrices']} matrices "
        f"({report['weight_mb']:.0f} MB in fp32)",
        fontsize=9,
    )
    ax.set_ylim(0, bw * 1.6)
    ax.set_xticks(report["config"]["rows"])
    ax.legend(fontsize=8, loc="upper right")
    for dtype in report["config"]["steps"]:
        rows = [r for r in report["steps"] if r["dtype"] == dtype]
        cost.plot(
            [r["rows"] for r in rows],
            [r["cost_vs_fewest_rows"] for r in rows],
            "s--",
            color="black" if dtype == "fp32" else "#555555",
            label=f"whole model, {dtype} target",
        )
    cost.axhline(1.3, color="#bbbbbb", ls=":", lw=1)
    cost.set_xlabel("rows")
    cost.set_ylabel("time vs 1 row (median)")
    cost.set_title("cost of a row count (kernels' colours as left)", fontsize=9)
    cost.set_xticks(report["config"]["rows"])
    if report["steps"]:
        cost.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_kernel_report(report: dict, out: str) -> Path:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kernels.json").write_text(json.dumps(report, indent=2))
    plot_kernels(report, out_dir / "kernels.png")
    return out_dir
