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
from distspec.models.quantized import (
    QUANT_ACTIVATIONS,
    TILES,
    Q4Weight,
    QuantWeight,
    round_activations,
)


class LayerEpoch:
    """Bumped whenever a model's layers are rearranged (a linear layer, a KV cache replaced,
    activations switched): cached fused layers (llama.Block.fused_layer) check it in one
    read instead of walking their modules at every step."""

    value = 0

    @classmethod
    def bump(cls) -> None:
        cls.value += 1


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


class QuantLinear(nn.Module):
    """A linear layer with a weight-only quantized weight (models/quantized.py) and fp32
    activations. On CPU, distspec's q4/q8 kernels read the weight's blocks moved into tiles
    (Q4Tiles, Q8Tiles: the only copy kept); elsewhere (or without the kernels) the weight is
    dequantized for each call.

    int8_activations: x is first rounded to int8 per group of 32 (ggml's Q8_0) and the dot
    products are integer ones, as llama.cpp computes: faster, at the cost of that rounding
    (fp32: the exact product with the dequantized weight)."""

    def __init__(
        self, weight: QuantWeight, bias: torch.Tensor | None = None, int8_activations=False
    ):
        super().__init__()
        self._int8_activations = int8_activations
        self.kind, self.format = weight.kind, type(weight)
        self.out_features, self.in_features = weight.shape
        self.ops = kernels()
        self.tiled = self.ops is not None and weight.qs.is_cpu
        parts = (TILES[self.format].from_planar(weight).data,) if self.tiled else weight.parts()
        self.n_parts = len(parts)
        for i, part in enumerate(parts):  # buffers, so that .to() moves them
            self.register_buffer(f"_w{i}", part.contiguous(), persistent=False)
        self.bias = None if bias is None else bias.detach().float().contiguous()

    @property
    def int8_activations(self) -> bool:
        return self._int8_activations

    @int8_activations.setter
    def int8_activations(self, value: bool) -> None:
        self._int8_activations = value
        LayerEpoch.bump()

    @property
    def weight(self) -> QuantWeight:
        if self.tiled:
            return TILES[self.format](self._w0, self.out_features).planar()
        return self.format(*(getattr(self, f"_w{i}") for i in range(self.n_parts)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the hot path reads the buffers directly: a decode step makes ~120 of these calls
        if self.tiled and self.ops is not None and x.dtype == torch.float32 and x.is_cpu:
            kernel = self.ops.q4_linear if self.format is Q4Weight else self.ops.q8_linear
            return kernel(x, self._w0, self.out_features, self.bias, self._int8_activations)
        w = self.weight
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.int8_activations:
            x = round_activations(x)
        return F.linear(x, w.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.kind}"


def kernel_op(linear: nn.Module, ops):
    """linear as one of the kernels' LinearOps (kernels/decoder_layer.h), sharing its weight;
    None for a layer they do not run (oneDNN-packed, not fp32, not on CPU)."""
    if isinstance(linear, QuantLinear):
        if not linear.tiled or linear.ops is None:
            return None
        kind = "q4" if linear.format is Q4Weight else "q8"
        parts = [getattr(linear, f"_w{i}") for i in range(linear.n_parts)]
        return ops.LinearOp(kind, parts, linear.bias, linear.int8_activations, linear.out_features)
    if not isinstance(linear, SkinnyLinear | nn.Linear):
        return None
    w, bias = linear.weight.detach(), linear.bias
    if w.dtype != torch.float32 or w.device.type != "cpu" or not w.is_contiguous():
        return None
    bias = None if bias is None else bias.detach().contiguous()
    return ops.LinearOp("fp32", [w], bias, False)


def set_activations(model: nn.Module, dtype: str) -> None:
    """Activations of every QuantLinear of model: "fp32" or "int8" (see QuantLinear)."""
    if dtype not in QUANT_ACTIVATIONS:
        raise ValueError(f"quantized layers' activations are fp32 or int8, got {dtype!r}")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.int8_activations = dtype == "int8"


def pack_for_cpu(model: nn.Module, use_kernels: bool = True) -> None:
    """Swap every CPU nn.Linear of a model for the fastest decode-shaped layer (in place):
    SkinnyLinear for fp32 where distspec's kernels run (use_kernels), else PackedLinear where
    oneDNN runs the weight's dtype, else nn.Linear as it is."""
    ops = kernels() if use_kernels else None
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child.weight.device.type != "cpu":
                continue
            if ops is not None and child.weight.dtype == torch.float32:
                setattr(parent, name, SkinnyLinear(child, ops))
            elif onednn_runs(child.weight.dtype):
                setattr(parent, name, PackedLinear(child))


def onednn_runs(dtype: torch.dtype) -> bool:
    """oneDNN has CPU kernels for this dtype here (bf16 and fp16 need CPU support: without it
    its packed linear fails to build a primitive)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return dtype == torch.float32
