"""Drafting step latency of exact vs fuzzy (EasySpec) drafting, on one process and on a
layer-parallel group of ranks, and the analytical model of the speed-up fed with measured
per-sublayer times (docs/easyspec.md).

Model of one single-token drafting step with L layers, groups of N layers (G groups, the
other L - N·G layers exact) on k ranks:

    exact:  t_out + L·(t_attn + t_mlp)
    fuzzy:  t_out + (L - N·G)·(t_attn + t_mlp) + G·(ceil(N/k)·t_attn + N·t_mlp + t_gather(N))

t_out is the embedding and output head, t_gather(N) one all-reduce of N hidden vectors
(0 on one rank). Only the attentions run in parallel; the MLPs stay sequential.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from distspec.models.llama import Transformer, easyspec_groups
from distspec.models.step_timing import decode_step_times


@dataclass
class SublayerTimes:
    """Seconds per single-token step: one attention and one MLP sublayer (means over the
    layers), and the rest of the step (embedding, norms, output head)."""

    attn_s: float
    mlp_s: float
    outside_s: float
    num_layers: int

    def exact_s(self) -> float:
        return self.outside_s + self.num_layers * (self.attn_s + self.mlp_s)

    def fuzzy_s(
        self, group: int, ranks: int, gather_s: float, exact: tuple[int, int] = (1, 1)
    ) -> float:
        groups = len(easyspec_groups(self.num_layers, group, *exact))
        exact_layers = self.num_layers - group * groups
        per_group = math.ceil(group / ranks) * self.attn_s + group * self.mlp_s
        if ranks > 1:
            per_group += gather_s
        return self.outside_s + exact_layers * (self.attn_s + self.mlp_s) + groups * per_group


@contextmanager
def _sublayer_clock(model: Transformer, totals: dict[str, float]):
    """Adds the wall time of every attention and MLP call to totals["attn"], totals["mlp"]."""
    handles, started = [], {}

    def hooks(kind: str):
        def before(module, args):
            started[id(module)] = time.perf_counter()

        def after(module, args, output):
            totals[kind] += time.perf_counter() - started.pop(id(module))

        return before, after

    for layer in model.layers:
        for kind, module in (("attn", layer.attn), ("mlp", layer.mlp)):
            before, after = hooks(kind)
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def sublayer_times(model: Transformer, context_len: int = 256, steps: int = 32) -> SublayerTimes:
    """Per-sublayer times of exact single-token steps after context_len tokens (KV slot 0)."""
    per_step: list[dict[str, float]] = []

    def clock() -> AbstractContextManager:
        per_step.append({"attn": 0.0, "mlp": 0.0})
        return _sublayer_clock(model, per_step[-1])

    walls = decode_step_times(model, context_len, steps, around=clock)
    layers = model.config.num_hidden_layers
    attn = statistics.median(t["attn"] for t in per_step)
    mlp = statistics.median(t["mlp"] for t in per_step)
    wall = statistics.median(walls)
    return SublayerTimes(attn / layers, mlp / layers, max(0.0, wall - attn - mlp), layers)


@dataclass
class TimingRow:
    group: int
    ranks: int
    groups: int  # fuzzy groups in the drafter
    exact_ms: float  # one process with as many threads as ranks (the same cores)
    exact_1thread_ms: float  # one process, one thread (one rank's share of the machine)
    fuzzy_1rank_ms: float  # the same fuzzy groups, sequentially, one thread
    fuzzy_ms: float  # the fuzzy groups over `ranks` processes, one thread each
    gather_ms: float  # one all-reduce of `group` hidden vectors over the ranks
    model_fuzzy_ms: float  # the analytical model's prediction of fuzzy_ms
    model_fuzzy_1rank_ms: float


def run_easyspec_timing(
    model_name: str = "demo",
    group_sizes: tuple[int, ...] = (2, 3, 4, 5),
    ranks: int = 2,
    context_len: int = 256,
    steps: int = 32,
    repeats: int = 5,
    exact: tuple[int, int] = (1, 1),
) -> dict:
    """Measures every contender `repeats` times, alternating them, and keeps medians."""
    from distspec.models.loader import demo_gguf_path
    from distspec.workers.drafter import DrafterSpec, DrafterWorker
    from distspec.workers.local_group import LocalGroup

    drafter = str(demo_gguf_path()) if model_name == "demo" else model_name
    spec = DrafterSpec(
        drafter,
        model_name,
        num_slots=1,
        max_len=context_len + steps + 1,
        lookup=False,
        parallel="layer",
        easyspec_group=max(group_sizes),
        easyspec_exact=exact,
    )
    threads = torch.get_num_threads()
    local = DrafterWorker(spec)  # one process: exact and sequential fuzzy steps
    samples: dict[str, list[float]] = {}

    def sample(key: str, seconds: float) -> None:
        samples.setdefault(key, []).append(seconds * 1e3)

    with LocalGroup(DrafterWorker, spec, ranks, threads=1) as group:
        hidden = local.model.model.config.hidden_size
        for _ in tqdm(range(repeats), desc="bench-easyspec timing"):
            torch.set_num_threads(ranks)
            sample("exact", local.time_steps(0, context_len, steps))
            torch.set_num_threads(1)
            sample("exact_1thread", local.time_steps(0, context_len, steps))
            for g in group_sizes:
                sample(f"fuzzy_1rank_{g}", local.time_steps(g, context_len, steps))
                sample(f"fuzzy_{g}", group.leader.time_steps(g, context_len, steps))
                sample(f"gather_{g}", group.leader.time_all_reduce(g * hidden))
        torch.set_num_threads(1)
        sublayers = sublayer_times(local.model.model, context_len, steps)
    torch.set_num_threads(threads)
    med = {key: statistics.median(values) for key, values in samples.items()}
    rows = []
    for g in group_sizes:
        gather_s = med[f"gather_{g}"] / 1e3
        rows.append(
            TimingRow(
                group=g,
                ranks=ranks,
                groups=len(easyspec_groups(sublayers.num_layers, g, *exact)),
                exact_ms=med["exact"],
                exact_1thread_ms=med["exact_1thread"],
                fuzzy_1rank_ms=med[f"fuzzy_1rank_{g}"],
                fuzzy_ms=med[f"fuzzy_{g}"],
                gather_ms=med[f"gather_{g}"],
                model_fuzzy_ms=sublayers.fuzzy_s(g, ranks, gather_s, exact) * 1e3,
                model_fuzzy_1rank_ms=sublayers.fuzzy_s(g, 1, 0.0, exact) * 1e3,
            )
        )
    return {
        "model": model_name,
        "context_len": context_len,
        "sublayers_ms": {
            "attn": sublayers.attn_s * 1e3,
            "mlp": sublayers.mlp_s * 1e3,
            "outside": sublayers.outside_s * 1e3,
            "num_layers": sublayers.num_layers,
            "model_exact": sublayers.exact_s() * 1e3,
        },
        "rows": [asdict(r) for r in rows],
    }
