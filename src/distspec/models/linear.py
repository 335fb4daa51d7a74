"""Linear layers for CPU inference, chosen per weight by `pack_for_cpu`.

Decoding multiplies a few rows (a step, a verification chunk, a small batch) by every weight
matrix, so its speed is the speed of reading the weights. Prefill multiplies many rows and is
bound by arithmetic instead: BLAS is best there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distspec.models.cpu_kernels import kernels


class SkinnyLinear(nn.Module):
    """fp32 weight in its plain [out, in] layout. Up to MAX_ROWS rows of input go through
    distspec's skinny_linear kernel (the weight read once, at memory bandwidth, whatever the
    number of rows); more rows through BLAS. The weight is shared, not copied (a tied head
    keeps one matrix)."""

    def __init__(self, linear: nn.Linear, ops):
        super().__init__()
        self.ops, self.max_rows = ops, ops.MAX_ROWS
        self.out_features, self.in_features = linear.out_features, linear.in_features
        self.weight = linear.weight.detach().contiguous()
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= self.max_rows * self.in_features and x.dtype == torch.float32:
            return self.ops.skinny_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class PackedLinear(nn.Module):
    """A linear layer whose weight is pre-packed in oneDNN's blocked layout (CPU only).

    Same fp32 arithmetic as nn.Linear, but oneDNN's small-batch kernels stream the weight at
    close to memory bandwidth, where the default BLAS path reaches about half of it and gets
    2-3x slower from 1 to 4 rows -- exactly the shapes of decoding and verification.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features = linear.out_features
        self.weight = linear.weight.detach().to_mkldnn()
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The op inductor emits for packed CPU linears: dense in, dense out, no layout copies.
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def pack_for_cpu(model: nn.Module, use_kernels: bool = True) -> None:
    """Swap every CPU nn.Linear of a model for the fastest decode-shaped layer (in place):
    SkinnyLinear for fp32 where distspec's kernels run (use_kernels), else PackedLinear."""
    ops = kernels() if use_kernels else None
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child.weight.device.type != "cpu":
                continue
            if ops is not None and child.weight.dtype == torch.float32:
                setattr(parent, name, SkinnyLinear(child, ops))
            elif torch.backends.mkldnn.is_available():
                setattr(parent, name, PackedLinear(child))
