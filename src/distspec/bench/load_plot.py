"""bench-load's figure: throughput and p99 latencies against clients, RSS over time."""

from __future__ import annotations

from pathlib import Path

TOP_PROCESSES = 6  # the largest ones get their own line; the rest share "others"


def plot_load(report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report.levels
    clients = [lv.clients for lv in levels]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))

    ax1.plot(clients, [lv.tokens_per_s for lv in levels], "o-", color="#3b75af")
    for lv in levels:
        ax1.annotate(
            f"{lv.tokens_per_s:.0f} tok/s\n{lv.rejection_rate:.0%} rejected",
            (lv.clients, lv.tokens_per_s),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=7,
        )
    ax1.set_xlabel("concurrent clients")
    ax1.set_ylabel("aggregate tokens/s")
    ax1.set_ylim(0, max([lv.tokens_per_s for lv in levels] + [1]) * 1.3)
    ax1.set_xticks(clients)

    def values(key: str) -> list[float]:
        return [float("nan") if getattr(lv, key) is None else getattr(lv, key) for lv in levels]

    red, green = "#c0504d", "#4f9a4f"
    ax2.plot(clients, values("ttft_p99_s"), "o-", color=red, label="TTFT p99")
    ax2.plot(clients, values("ttft_p50_s"), "o:", color=red, lw=1, label="TTFT p50")
    ax2.set_xlabel("concurrent clients")
    ax2.set_ylabel("time to first token (s)", color=red)
    ax2.set_xticks(clients)
    ax2.set_ylim(bottom=0)
    twin = ax2.twinx()
    twin.plot(clients, values("itl_p99_ms"), "s-", color=green, label="ITL p99")
    twin.plot(clients, values("itl_p50_ms"), "s:", color=green, lw=1, label="ITL p50")
    twin.set_ylabel("inter-token latency (ms)", color=green)
    twin.set_ylim(bottom=0)
    handles = ax2.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax2.legend(handles=handles, fontsize=7, loc="upper left")

    series = report.rss_series
    if series["t_s"]:
        t = series["t_s"]
        ax3.plot(t, series["total_mb"], color="black", lw=2, label="total")
        per = series["per_process_mb"]
        ranked = sorted(per, key=lambda k: -max(per[k]))
        for name in ranked[:TOP_PROCESSES]:
            ax3.plot(t, per[name], lw=1, label=name[:32])
        if len(ranked) > TOP_PROCESSES:
            rest = [sum(per[k][i] for k in ranked[TOP_PROCESSES:]) for i in range(len(t))]
            ax3.plot(t, rest, lw=1, ls=":", label=f"{len(ranked) - TOP_PROCESSES} others")
        start = levels[0].t0
        for lv in levels:
            x = lv.t0 - start
            ax3.axvline(x, color="grey", lw=0.6, ls="--")
            ax3.annotate(f"{lv.clients}", (x, 0), xytext=(2, 2), textcoords="offset points",
                         fontsize=7, color="grey")  # fmt: skip
        ax3.set_ylim(bottom=0)
        ax3.legend(fontsize=6, loc="center right")
    else:
        ax3.text(0.5, 0.5, "RSS not measured", ha="center", transform=ax3.transAxes)
    ax3.set_xlabel("time since the first level (s); dashed: a level starts (clients)")
    ax3.set_ylabel("RSS (MB)")

    cfg = report.config
    server = cfg.server or f"{cfg.target} + {cfg.drafter}, {cfg.num_slots} slots"
    fig.suptitle(
        f"distspec bench-load: {server}, max_waiting {cfg.max_waiting}, {cfg.duration_s:g} s "
        f"per level, {cfg.max_new_tokens} new tokens, T={cfg.temperature:g}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
