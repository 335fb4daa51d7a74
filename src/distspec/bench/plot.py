"""Bar chart of a benchmark summary."""

from __future__ import annotations

from pathlib import Path


def plot_bench(summary: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    tps = [summary[n]["tokens_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    bars = ax.bar(names, tps, color=["#999999" if n.startswith("hf") else "#3b75af" for n in names])
    for bar, n in zip(bars, names, strict=True):
        s = summary[n]
        label = f"{s['tokens_per_s']:.1f}"
        if s.get("tokens_per_target_forward") is not None:
            label += f"\ntau {s['tokens_per_target_forward']:.2f}"
        ax.annotate(
            label,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_ylabel("tokens/s (median)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, max(tps) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
