"""Decode steps and short verification chunks replayed from CUDA graphs (gpt-fast's way).

A small model on a GPU is bound by kernel launches, not by the GPU: the demo's eager step is
some 300 launches. Each (slot, chunk length, last) gets its graph the first time it runs:
the step is recorded once through the model's sync-free form (`Transformer.forward` with a
slot number: attention over the whole static cache under a position mask, K/V written by
index), then replayed with the new tokens and positions copied into its input buffers.
Other calls (batches, trees, long chunks, tensor parallel) stay eager.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from distspec.models.linear import LayerEpoch

MAX_CHUNK = 17  # a decode step and verification chunks of up to 16 draft tokens


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor
    pos: torch.Tensor
    logits: torch.Tensor


class CapturedSteps:
    """One CUDA graph per (slot, chunk length, last) of a single-sequence forward of `model`."""

    def __init__(self, model) -> None:
        self.model = model
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int, int], _Graph] = {}
        self.epoch = LayerEpoch.value

    def fits(self, tokens: torch.Tensor, fuzzy_groups, tree) -> bool:
        bsz, t = tokens.shape
        return bsz == 1 and t <= MAX_CHUNK and not fuzzy_groups and tree is None

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, slot: int, last: int):
        if self.epoch != LayerEpoch.value:  # new weights or KV cache: old addresses
            self.graphs.clear()
            self.epoch = LayerEpoch.value
        key = (slot, tokens.shape[1], last)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(tokens, pos, slot, last)
        else:
            g.tokens.copy_(tokens)
            g.pos.copy_(pos)
        g.graph.replay()
        return g.logits.clone()

    def _capture(self, tokens, pos, slot, last) -> _Graph:
        # Warm-up runs on a side stream (as torch.cuda.graphs asks) are the real step: they
        # write the same K/V the replay writes again.
        model = self.model
        tokens, pos = tokens.clone(), pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model.forward(tokens, pos, slot, last)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = model.forward(tokens, pos, slot, last)
        return _Graph(graph, tokens, pos, logits)


def capture_steps(model) -> None:
    """Replay `model`'s single-sequence steps from CUDA graphs where they apply (a CUDA model
    without tensor parallelism; DISTSPEC_CUDA_GRAPHS=0 keeps every step eager)."""
    if model.device.type != "cuda" or model.tp.enabled:
        return
    if os.environ.get("DISTSPEC_CUDA_GRAPHS", "1") == "0":
        return
    vars(model)["_graphs"] = CapturedSteps(model)
