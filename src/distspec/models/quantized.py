"""Quantized weight formats: ggml's blocks as plain tensors, read by kernels/quant_linear.cpp.

Both formats split each weight row into groups of 32 along the input dimension and keep the
group's fp16 scale (and min) next to its integers, exactly as a GGUF file stores them, but in
planar tensors (integers, scales, mins) so that rows can be sliced, concatenated and sharded:

- Q4Weight (4 bits, GGUF Q4_1 and Q4_0): W = q * scale + min, q in 0..15. Q4_0's (q - 8) * d
  is the same value with min = -8 * d (exact in fp32 and fp16).
- Q8Weight (8 bits, GGUF Q8_0): W = q * scale, q in -127..127.

`from_gguf` takes a tensor's raw blocks without touching a bit; `quantize` rounds fp weights
the way ggml's reference quantizers do (so a model quantized here is one llama.cpp could have
written).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

GROUP = 32
# GGUF (GGML) tensor type ids of the block formats read here
GGML_Q4_0, GGML_Q4_1, GGML_Q8_0 = 2, 3, 8
QUANT_DTYPES = ("int8", "int4")
# what quantized linears multiply: fp32 x, or x rounded to int8 per group (llama.cpp's way)
QUANT_ACTIVATIONS = ("fp32", "int8")


@dataclass
class Q4Weight:
    qs: torch.Tensor  # uint8 [N, K / 2]: per group, byte j holds element j (low), j + 16 (high)
    scales: torch.Tensor  # float16 [N, K / 32]
    mins: torch.Tensor  # float16 [N, K / 32]

    kind = "int4"

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.scales.shape[1] * GROUP

    def parts(self) -> tuple[torch.Tensor, ...]:
        return self.qs, self.scales, self.mins

    def codes(self) -> torch.Tensor:
        """q as uint8 [N, K], in element order."""
        n, g = self.qs.shape[0], self.scales.shape[1]
        q = self.qs.view(n, g, 1, GROUP // 2)
        return torch.cat([q & 0x0F, q >> 4], dim=2).view(n, g * GROUP)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.shape
        q = self.codes().view(n, -1, GROUP).float()
        w = self.scales.float()[..., None] * q + self.mins.float()[..., None]
        return w.view(n, k).to(dtype)

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Q4Weight:
        """ggml's Q4_1 rounding: per group, min and (max - min) / 15."""
        g = _groups(w)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        d = (hi - lo) / 15
        inv = torch.where(d == 0, 0.0, 1 / d)
        q = torch.trunc((g - lo) * inv + 0.5).clamp(0, 15).to(torch.uint8)
        return cls(_pack_nibbles(q), d.squeeze(-1).half(), lo.squeeze(-1).half())

    @classmethod
    def from_gguf(cls, raw: np.ndarray, ggml_type: int) -> Q4Weight:
        """raw: a GGUF tensor's data as uint8 [N, blocks * block bytes] (Q4_0 or Q4_1)."""
        n = raw.shape[0]
        if ggml_type == GGML_Q4_1:
            b = raw.reshape(n, -1, 20)
            d, m, qs = b[..., 0:2], b[..., 2:4], b[..., 4:]
            mins = _halves(m)
        elif ggml_type == GGML_Q4_0:
            b = raw.reshape(n, -1, 18)
            d, qs = b[..., 0:2], b[..., 2:]
            mins = _halves(d) * -8
        else:
            raise ValueError(f"not a 4-bit GGUF block type: {ggml_type}")
        return cls(_bytes(qs.reshape(n, -1)), _halves(d), mins)


@dataclass
class Q8Weight:
    qs: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # float16 [N, K / 32]

    kind = "int8"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qs.shape)

    def parts(self) -> tuple[torch.Tensor, ...]:
        return self.qs, self.scales

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.shape
        w = self.qs.view(n, -1, GROUP).float() * self.scales.float()[..., None]
        return w.view(n, k).to(dtype)

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Q8Weight:
        """ggml's Q8_0 rounding: per group, scale = max |w| / 127, round half away from 0."""
        g = _groups(w)
        d = g.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d == 0, 0.0, 1 / d)
        x = g * inv
        q = (torch.sign(x) * torch.floor(x.abs() + 0.5)).to(torch.int8)
        return cls(q.view(w.shape[0], -1), d.squeeze(-1).half())

    @classmethod
    def from_gguf(cls, raw: np.ndarray, ggml_type: int) -> Q8Weight:
        if ggml_type != GGML_Q8_0:
            raise ValueError(f"not an 8-bit GGUF block type: {ggml_type}")
        n = raw.shape[0]
        b = raw.reshape(n, -1, 34)
        return cls(_bytes(b[..., 2:].reshape(n, -1)).view(torch.int8), _halves(b[..., 0:2]))


# The layouts the CPU kernels read (kernels/quant_linear.cpp): 16 output rows by one group of
# 32 inputs in one tile, so that one 64-byte load feeds 16 rows at once and no sum crosses
# vector lanes (ggml's interleaved blocks for x86, in spirit). The same bits as the planar
# weight, moved: `planar()` gives it back exactly. Rows past n (the last tile of an n that is
# not a multiple of 16) are zero.
TILE_ROWS = 16


@dataclass
class Q4Tiles:
    """A Q4Weight in tiles of 320 bytes. In tile [t, g], for rows 16t + r:

    - bytes 64j .. 64j + 63 (j = 0..3): 16 dwords, dword r for row r; its byte b holds the
      code of input 32g + 8j + b in the low nibble and of input 32g + 8j + 4 + b in the high;
    - bytes 256 .. 287: the 16 rows' fp16 scales, 288 .. 319: their fp16 mins."""

    data: torch.Tensor  # uint8 [ceil(n / 16), K / 32, 320]
    n: int

    @classmethod
    def from_planar(cls, w: Q4Weight) -> Q4Tiles:
        t, g = _tile_counts(w.shape)
        c = _pad_rows(w.codes(), t).view(t, TILE_ROWS, g, 4, 2, 4)  # [t, r, g, j, h, b]
        packed = (c[..., 0, :] | (c[..., 1, :] << 4)).permute(0, 2, 3, 1, 4)  # [t, g, j, r, b]
        parts = [packed.reshape(t, g, 256), _fp16_tiles(w.scales, t), _fp16_tiles(w.mins, t)]
        return cls(torch.cat(parts, dim=2).contiguous(), w.shape[0])

    def planar(self) -> Q4Weight:
        t, g, _ = self.data.shape
        packed = self.data[..., :256].reshape(t, g, 4, TILE_ROWS, 4)
        c = torch.stack([packed & 0x0F, packed >> 4], dim=3)  # [t, g, j, h, r, b]
        codes = c.permute(0, 4, 1, 2, 3, 5).reshape(t * TILE_ROWS, g, GROUP)[: self.n]
        scales, mins = (_fp16_rows(self.data[..., i : i + 32], self.n) for i in (256, 288))
        return Q4Weight(_pack_nibbles(codes), scales, mins)


@dataclass
class Q8Tiles:
    """A Q8Weight in tiles of 544 bytes. In tile [t, g], for rows 16t + r:

    - bytes 64j .. 64j + 63 (j = 0..7): 16 dwords, dword r for row r; its byte b holds the
      (signed) code of input 32g + 4j + b;
    - bytes 512 .. 543: the 16 rows' fp16 scales."""

    data: torch.Tensor  # uint8 [ceil(n / 16), K / 32, 544]
    n: int

    @classmethod
    def from_planar(cls, w: Q8Weight) -> Q8Tiles:
        t, g = _tile_counts(w.shape)
        c = _pad_rows(w.qs.view(torch.uint8), t).view(t, TILE_ROWS, g, 8, 4)  # [t, r, g, j, b]
        codes = c.permute(0, 2, 3, 1, 4).reshape(t, g, 512)
        data = torch.cat([codes, _fp16_tiles(w.scales, t)], dim=2).contiguous()
        return cls(data, w.shape[0])

    def planar(self) -> Q8Weight:
        t, g, _ = self.data.shape
        c = self.data[..., :512].reshape(t, g, 8, TILE_ROWS, 4).permute(0, 3, 1, 2, 4)
        qs = c.reshape(t * TILE_ROWS, g * GROUP)[: self.n].contiguous().view(torch.int8)
        return Q8Weight(qs, _fp16_rows(self.data[..., 512:], self.n))


TILES = {Q4Weight: Q4Tiles, Q8Weight: Q8Tiles}


def _tile_counts(shape: tuple[int, int]) -> tuple[int, int]:
    n, k = shape
    return -(-n // TILE_ROWS), k // GROUP


def _pad_rows(a: torch.Tensor, tiles: int) -> torch.Tensor:
    return torch.nn.functional.pad(a, (0, 0, 0, tiles * TILE_ROWS - a.shape[0]))


def _fp16_tiles(a: torch.Tensor, tiles: int) -> torch.Tensor:
    """fp16 [n, g] -> bytes [tiles, g, 32]: each tile's 16 rows side by side."""
    g = a.shape[1]
    a = _pad_rows(a, tiles).view(tiles, TILE_ROWS, g).permute(0, 2, 1).contiguous()
    return a.view(torch.uint8).view(tiles, g, 2 * TILE_ROWS)


def _fp16_rows(a: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of _fp16_tiles, the first n rows."""
    t, g, _ = a.shape
    a = a.contiguous().view(torch.float16).view(t, g, TILE_ROWS)
    return a.permute(0, 2, 1).reshape(t * TILE_ROWS, g)[:n].contiguous()


QuantWeight = Q4Weight | Q8Weight
FORMATS = {"int4": Q4Weight, "int8": Q8Weight}
GGUF_FORMATS = {GGML_Q4_0: Q4Weight, GGML_Q4_1: Q4Weight, GGML_Q8_0: Q8Weight}


def quantize(w: torch.Tensor, dtype: str) -> QuantWeight:
    """fp weight [N, K] (K a multiple of 32) in format `dtype` ("int8" or "int4")."""
    if dtype not in FORMATS:
        raise ValueError(f"unknown quantized dtype {dtype!r} (expected one of {QUANT_DTYPES})")
    return FORMATS[dtype].quantize(w)


def is_quantized(w) -> bool:
    return isinstance(w, Q4Weight | Q8Weight)


def round_activations(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the int8-activation kernels round it: per group of 32 along the last dim,
    to multiples of max |x| / 127 (ggml's Q8_0, round half away from zero)."""
    g = x.float().reshape(*x.shape[:-1], -1, GROUP)
    d = g.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, 0.0, 1 / d)
    y = g * inv
    q = torch.sign(y) * torch.floor(y.abs() + 0.5)
    return (q * d).reshape(x.shape).to(x.dtype)


# Row and column operations on fp tensors and quantized weights alike: the loader fuses
# (q, k, v), (gate, up) and shards them for tensor parallelism through these.


def take_rows(w, start: int, end: int):
    if not is_quantized(w):
        return w[start:end]
    return type(w)(*(p[start:end] for p in w.parts()))


def take_cols(w, start: int, end: int):
    if not is_quantized(w):
        return w[:, start:end]
    if start % GROUP or end % GROUP:
        raise ValueError(
            f"a quantized weight splits along its inputs at multiples of {GROUP} only "
            f"(asked for columns {start}:{end}); use fewer tensor-parallel ranks"
        )
    g0, g1 = start // GROUP, end // GROUP
    per_group = [p.shape[1] // w.scales.shape[1] for p in w.parts()]
    return type(w)(*(p[:, g0 * s : g1 * s] for p, s in zip(w.parts(), per_group, strict=True)))


def cat_rows(ws: list):
    if not is_quantized(ws[0]):
        return torch.cat(ws)
    if len({type(w) for w in ws}) > 1:
        raise ValueError("cannot fuse weights of different quantized formats")
    return type(ws[0])(*(torch.cat(ps) for ps in zip(*(w.parts() for w in ws), strict=True)))


def _groups(w: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"quantizing needs a multiple of {GROUP} inputs, got {k}")
    return w.detach().float().reshape(n, k // GROUP, GROUP)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, G, 32] -> [N, G * 16] in ggml's order."""
    n = q.shape[0]
    return (q[..., : GROUP // 2] | (q[..., GROUP // 2 :] << 4)).reshape(n, -1).contiguous()


def _bytes(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint8))


def _halves(a: np.ndarray) -> torch.Tensor:
    """fp16 values stored as byte pairs [..., 2] -> float16 [...]."""
    return torch.from_numpy(np.ascontiguousarray(a).view(np.float16)[..., 0].copy())
