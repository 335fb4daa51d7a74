"""Tensor-parallel groups of workers: every rank runs the same model calls.

The leader (rank 0) receives each call, from the scheduler directly or through Ray, and
broadcasts it to the other ranks with torch.distributed, so a step costs one call to the
leader plus one broadcast, not a Ray round trip per rank. The other ranks sit in `follow()`.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from distspec.models.tensor_parallel import TPContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupSpec:
    rank: int = 0
    world_size: int = 1
    init_method: str | None = None  # "tcp://host:port" of the rendezvous (world_size > 1)
    backend: str = "gloo"  # "nccl" on GPUs
    timeout_s: float = 300.0


def join_group(spec: GroupSpec) -> TPContext:
    if spec.world_size == 1:
        return TPContext()
    dist.init_process_group(
        spec.backend,
        init_method=spec.init_method,
        rank=spec.rank,
        world_size=spec.world_size,
        timeout=datetime.timedelta(seconds=spec.timeout_s),
    )
    return TPContext(spec.rank, spec.world_size, dist.group.WORLD)


class GroupMember:
    """Base of workers forming a TP group. On the leader, `collective(name, *args)` runs
    method `name` on every rank; ranks > 0 run `follow()` until the leader calls `leave()`."""

    tp: TPContext = TPContext()

    def collective(self, method: str, *args: Any) -> Any:
        if self.tp.enabled:
            self._broadcast((method, args))
        return getattr(self, method)(*args)

    def follow(self) -> None:
        if self.tp.rank == 0:
            raise RuntimeError("the leader rank does not follow")
        while (call := self._broadcast(None)) is not None:
            method, args = call
            getattr(self, method)(*args)
        dist.destroy_process_group()

    def leave(self) -> None:
        """Leader: release the other ranks from follow() and leave the group."""
        if self.tp.enabled and dist.is_initialized():
            self._broadcast(None)
            dist.destroy_process_group()

    def _broadcast(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.tp.group)
        return box[0]
