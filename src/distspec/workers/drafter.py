"""A drafter on one rank of its own tensor-parallel group (its TP size need not be the
target's), drafting for many sessions, each in its own KV slot."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from distspec.engine import load_drafter, new_drafter
from distspec.spec.draft_policy import time_drafter
from distspec.spec.drafter import Draft, Drafter
from distspec.spec.sampling import SamplingParams
from distspec.workers.group import GroupMember, GroupSpec, join_group
from distspec.workers.messages import DraftRequest


@dataclass
class DrafterSpec:
    model: str = "demo"  # demo | ngram | a model path
    target: str = "demo"  # the target: its tokenizer (and embedding, for demo-style drafters)
    num_slots: int = 16
    max_len: int = 2048
    lookup: bool = True  # model drafters start with prompt-lookup matches
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None


class DrafterWorker(GroupMember):
    def __init__(self, spec: DrafterSpec, group: GroupSpec | None = None):
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.tp = join_group(group or GroupSpec())
        self.model = load_drafter(
            spec.model,
            spec.target,
            max_len=spec.max_len,
            num_slots=spec.num_slots,
            tp=self.tp,
            device=spec.device,
            dtype=getattr(torch, spec.dtype),
        )
        self._drafters: dict[int, Drafter] = {}
        self.busy_s = 0.0

    def ready(self) -> bool:
        return True

    # -- leader API (each runs on every rank) ----------------------------------------------

    def open_session(
        self, session: int, slot: int, prompt_ids: list[int], params: SamplingParams
    ) -> None:
        self.collective("_open", session, slot, prompt_ids, params)

    def close_session(self, session: int) -> None:
        self.collective("_close", session)

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        t = time.perf_counter()
        drafts = self.collective("_propose", requests)
        self.busy_s += time.perf_counter() - t
        return drafts

    def stats(self) -> dict:
        return {"busy_s": self.busy_s}

    def calibrate(self, k: int, vocab_size: int) -> float:
        """Seconds per drafted token (time_drafter); before any session uses slot 0."""
        return self.collective("_time_drafter", k, vocab_size)

    def _time_drafter(self, k: int, vocab_size: int) -> float:
        return time_drafter(new_drafter(self.model, self.spec.lookup), vocab_size, k)

    # -- every rank ------------------------------------------------------------------------

    def _open(self, session: int, slot: int, prompt_ids: list[int], params: SamplingParams):
        drafter = new_drafter(self.model, self.spec.lookup, slot)
        drafter.start(prompt_ids, params)
        self._drafters[session] = drafter

    def _close(self, session: int) -> None:
        drafter = self._drafters.pop(session, None)
        if drafter is not None:
            drafter.finish()

    def _propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [self._drafters[r.session].propose(r.context, r.k) for r in requests]
