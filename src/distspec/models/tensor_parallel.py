"""Tensor parallelism as weight slicing plus one all-reduce per sublayer.

Attention is split by key/value head groups (a rank owns some KV heads and the query heads
that read them), the MLP by intermediate columns. Splits may be uneven: SmolLM2 has 3 KV heads,
so TP=2 gives ranks 2 and 1 heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPContext:
    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, x: torch.Tensor, spin: bool = False) -> torch.Tensor:
        """spin (CPU tensors): poll for completion instead of blocking. A blocked rank's core
        may go idle, and waking it can cost more than a small all-reduce (measured on this
        machine's VM: 0.77 ms blocking vs 0.44 ms polling for a 4.6 KB all-reduce after
        0.25 ms of compute)."""
        if self.world_size == 1:
            return x
        if spin and x.device.type == "cpu":
            work = dist.all_reduce(x, group=self.group, async_op=True)
            while not work.is_completed():
                pass
            work.wait()
        else:
            dist.all_reduce(x, group=self.group)
        return x


def split_range(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of rank's share of n items, as even as possible (earlier ranks get more)."""
    if world_size > n:
        raise ValueError(f"cannot split {n} heads/units over {world_size} tensor-parallel ranks")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
