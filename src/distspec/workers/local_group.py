"""A worker group on this machine without Ray: rank 0 in this process, the other ranks in
processes of their own, joined over gloo on localhost (`distspec generate` with a
layer-parallel drafter, the EasySpec timing benchmark, tests)."""

from __future__ import annotations

import logging
import multiprocessing as mp
import socket
from dataclasses import replace
from typing import Any

from distspec.workers.group import GroupMember, GroupSpec

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 30.0


class LocalGroup:
    def __init__(self, cls: type[GroupMember], spec: Any, world_size: int, threads: int = 1):
        """cls(spec, GroupSpec) on every rank. On CPU, ranks > 0 use `threads` torch threads
        each (rank 0 keeps this process's setting, which its other work shares); with
        spec.device "cuda", rank r uses GPU r and the group NCCL."""
        init = f"tcp://127.0.0.1:{_free_port()}"
        gpu = getattr(spec, "device", "cpu") == "cuda"
        backend = "nccl" if gpu else "gloo"

        def rank_spec(rank: int) -> Any:
            device = f"cuda:{rank}" if gpu else spec.device
            return replace(spec, device=device, threads=threads if rank else None)

        ctx = mp.get_context("spawn")  # a fork would copy this process's torch state
        self.processes = [
            ctx.Process(
                target=_follow,
                args=(cls, rank_spec(rank), GroupSpec(rank, world_size, init, backend)),
                name=f"distspec-rank{rank}",
                daemon=True,
            )
            for rank in range(1, world_size)
        ]
        for p in self.processes:
            p.start()
        try:
            self.leader = cls(rank_spec(0), GroupSpec(0, world_size, init, backend))
        except BaseException:
            self._stop(wait_s=0)
            raise

    def close(self) -> None:
        self.leader.leave()
        self._stop()

    def _stop(self, wait_s: float = JOIN_TIMEOUT_S) -> None:
        for p in self.processes:
            p.join(wait_s)
            if p.is_alive():
                log.warning("%s did not leave its group; terminating it", p.name)
                p.terminate()
                p.join()

    def __enter__(self) -> LocalGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _follow(cls: type[GroupMember], spec: Any, group: GroupSpec) -> None:
    if group.backend == "nccl":
        import torch

        torch.cuda.set_device(spec.device)  # NCCL's object broadcasts use the current GPU
    cls(spec, group).follow()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
