"""Sampling parameters, the distribution they define, and the one way tokens are drawn.

A sampled token is an exponential race (the Gumbel-max trick): token = argmax_v p(v) / E_v with
E ~ Exp(1) i.i.d., an exact draw from p. The E of each position are a function of the request's
seed and the position alone (`race_noise`), so whoever draws at a position (the target, a
drafter, a rank, an edge device) draws with the same noise. A drafter that races its own q
against the same noise proposes what the target will pick whenever the two distributions agree,
and the verifier only compares tokens (verify.py); the output is then the target's own draw at
every position whatever was drafted, how much, in which mode and batch: the same seed gives
the same text everywhere.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

import torch

_MASK64 = (1 << 64) - 1


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def seeded(self) -> SamplingParams:
        """These params with a seed: their own, else a fresh random one (chosen once per
        request, before the request's parts are handed to whoever drafts and verifies)."""
        if self.seed is not None or self.greedy:
            return self
        return dataclasses.replace(self, seed=random.getrandbits(62))


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Softmax of logits [..., V] after temperature, top-k and top-p (float32)."""
    logits = logits.float() / max(params.temperature, 1e-5)
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def race_noise(seed: int, pos: int, vocab: int) -> torch.Tensor:
    """E ~ Exp(1) [vocab] for sequence position pos of the request seeded `seed`."""
    g = torch.Generator().manual_seed(_splitmix64(_splitmix64(seed) ^ pos))
    u = torch.rand(vocab, generator=g, dtype=torch.float64)
    # u = 0 (chance 2^-53) would give E = 0: p / 0 is inf, or NaN for p = 0 (a token top-k or
    # top-p cut, which argmax would then pick); clamped, a zero-probability token never wins
    return (-torch.log1p(-u)).clamp_min(1e-300)


def draw(probs: torch.Tensor, seed: int, pos: int) -> torch.Tensor:
    """The tokens probs [rows, V] (or [V]) draw at positions pos, pos + 1, ...: [rows]."""
    rows = probs.reshape(-1, probs.shape[-1])
    vocab = rows.shape[-1]
    noise = torch.stack([race_noise(seed, pos + i, vocab) for i in range(len(rows))])
    return (rows.double().cpu() / noise).argmax(-1)
