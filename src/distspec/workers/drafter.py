"""A drafter on one rank of its own group, drafting for many sessions, each in its own KV slot.

The group's ranks split the drafter by tensor parallelism (its size need not be the
target's) or, with EasySpec, by layers: every rank holds the whole drafter and a fuzzy
group's attentions run on different ranks (Transformer.layer_parallel)."""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch

from distspec.models.llama import check_easyspec, easyspec_groups
from distspec.models.step_timing import decode_step_times
from distspec.models.tensor_parallel import TPContext
from distspec.spec_decode.draft_policy import time_drafter
from distspec.spec_decode.drafter import Draft, Drafter
from distspec.spec_decode.drafters import ModelDrafter
from distspec.spec_decode.drafters.batched import (
    propose_together,
    read_together,
    time_drafting_together,
)
from distspec.spec_decode.drafters.factory import load_drafter, new_drafter
from distspec.spec_decode.drafters.suffix import SuffixStore, TenantStores
from distspec.spec_decode.sampling import SamplingParams
from distspec.workers.group import GroupMember, GroupSpec, join_group
from distspec.workers.messages import DraftRequest
from distspec.workers.placement import apply_placement, current_placement


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
    parallel: str = "tensor"  # how the group's ranks split the drafter: tensor | layer
    easyspec_group: int = 0  # EasySpec: fuzzy groups of this many layers (0: exact drafting)
    easyspec_exact: tuple[int, int] = (1, 1)  # EasySpec: first and last layers kept exact
    cpus: tuple[int, ...] = ()  # the cores this rank is pinned to (empty: not pinned)
    tree_width: int = 1  # > 1: token trees with up to this many children per node
    prefix_cache: bool = True  # a prompt reuses what its KV slot holds of it

    def __post_init__(self) -> None:
        if self.parallel not in PARALLEL:
            raise ValueError(
                f"drafter parallelism must be one of {', '.join(PARALLEL)}, got {self.parallel!r}"
            )
        self.easyspec_exact = tuple(self.easyspec_exact)
        check_easyspec(self.easyspec_group, self.easyspec_exact)
        if self.easyspec_group and self.model == "ngram":
            raise ValueError("EasySpec needs a model drafter, not ngram")
        if self.parallel == "layer" and not self.easyspec_group:
            raise ValueError("layer-parallel drafting needs an EasySpec group size (>= 2)")


PARALLEL = ("tensor", "layer")


class DrafterWorker(GroupMember):
    def __init__(self, spec: DrafterSpec, group: GroupSpec | None = None):
        apply_placement(spec.cpus, spec.threads)
        self.spec = spec
        self.tp = join_group(group or GroupSpec())
        layer_parallel = spec.parallel == "layer"
        self.model = load_drafter(
            spec.model,
            spec.target,
            max_len=spec.max_len,
            num_slots=spec.num_slots,
            tp=TPContext() if layer_parallel else self.tp,
            device=spec.device,
            dtype=getattr(torch, spec.dtype),
        )
        self.fuzzy_groups: tuple[tuple[int, int], ...] = ()
        if self.model is not None:
            self.model.model.prefixes.enabled = spec.prefix_cache
        if self.model is not None and spec.easyspec_group:
            num_layers = self.model.model.config.num_hidden_layers
            self.fuzzy_groups = easyspec_groups(
                num_layers, spec.easyspec_group, *spec.easyspec_exact
            )
            if layer_parallel:
                self.model.model.layer_parallel = self.tp
        self._drafters: dict[int, Drafter] = {}
        self._slot_tenants: dict[int, str] = {}  # whose session each slot served last
        # suffix: each tenant's recent outputs, for its later sessions (TenantStores)
        self._stores = TenantStores() if spec.model == "suffix" else TenantStores(0)
        self.busy_s = 0.0

    def ready(self) -> bool:
        return True

    def placement(self) -> tuple[tuple[int, ...], int]:
        """(cores, torch threads) this rank computes with, read back."""
        return current_placement()

    # -- leader API (each runs on every rank) ----------------------------------------------

    def open_session(
        self,
        session: int,
        slot: int,
        prompt_ids: list[int],
        params: SamplingParams,
        tenant: str = "",
    ) -> None:
        """tenant: a suffix drafter drafts from this tenant's earlier outputs here too, and
        adds the session's to them ("": from its own text only)."""
        self.collective("_open", session, slot, prompt_ids, params, tenant)

    def close_session(self, session: int) -> None:
        self.collective("_close", session)

    def forget_prefixes(self) -> None:
        self.collective("_forget_prefixes")  # every rank reuses by its own records

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        t = time.perf_counter()
        drafts = self.collective("_propose", requests)
        self.busy_s += time.perf_counter() - t
        return drafts

    def read(self, requests: list[DraftRequest]) -> None:
        """Catch the sessions' drafters up with their contexts, without drafting (the
        scheduler's plain rounds): model drafters in one batched forward, the others
        (Drafter.read) one by one."""
        t = time.perf_counter()
        self.collective("_read", requests)
        self.busy_s += time.perf_counter() - t

    def stats(self) -> dict:
        return {"busy_s": self.busy_s}

    def set_tree_width(self, width: int) -> None:
        """The tree width of sessions opened from now on (benchmarks compare chains so)."""
        self.collective("_set_tree_width", width)

    def _set_tree_width(self, width: int) -> None:
        self.spec = dataclasses.replace(self.spec, tree_width=width)

    def calibrate(
        self, k: int, vocab_size: int
    ) -> tuple[float, float, tuple[tuple[int, float], ...]]:
        """(seconds per drafted token (time_drafter), the drafter's prior acceptance, seconds
        per drafting step for several sessions at once (time_drafting_together; empty for
        ngram)); before any session uses the KV slots."""
        return self.collective("_time_drafter", k, vocab_size)

    def time_steps(self, group_size: int, context_len: int = 256, steps: int = 32) -> float:
        """Benchmarks: median seconds of one single-token drafting forward after context_len
        tokens, exact (group_size 0) or with EasySpec groups of group_size layers (over the
        group's ranks when layer-parallel; the spec's exact layers). Uses KV slot 0."""
        return self.collective("_time_steps", group_size, context_len, steps)

    def time_all_reduce(self, numel: int, repeats: int = 50) -> float:
        """Benchmarks: median seconds of one all-reduce of numel values over the group."""
        return self.collective("_time_all_reduce", numel, repeats)

    def _time_drafter(self, k: int, vocab_size: int):
        drafter = self._new_drafter(0)
        together = ()
        if isinstance(drafter, ModelDrafter) and self.spec.num_slots > 1:
            drafters = [self._new_drafter(slot) for slot in range(self.spec.num_slots)]
            together = time_drafting_together(drafters, vocab_size, k)
        return time_drafter(drafter, vocab_size, k), drafter.prior_acceptance, together

    # -- every rank ------------------------------------------------------------------------

    def _open(
        self, session: int, slot: int, prompt_ids: list[int], params: SamplingParams, tenant=""
    ):
        if self.model is not None and self._slot_tenants.get(slot, tenant) != tenant:
            self.model.model.prefixes.hold(slot, [])  # no reuse of another tenant's prompt
        self._slot_tenants[slot] = tenant
        drafter = self._new_drafter(slot, self._stores.get(tenant) if tenant else None)
        drafter.start(prompt_ids, params)
        self._drafters[session] = drafter

    def _forget_prefixes(self) -> None:
        if self.model is not None:
            self.model.model.prefixes.forget()

    def _close(self, session: int) -> None:
        drafter = self._drafters.pop(session, None)
        if drafter is not None:
            drafter.finish()

    def _propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafters = [self._drafters[r.session] for r in requests]
        for d, r in zip(drafters, requests, strict=True):
            d.price_nodes(r.prices)
        if len(requests) > 1 and all(isinstance(d, ModelDrafter) for d in drafters):
            # one batched forward per drafting step for every session
            return propose_together(
                drafters, [r.context for r in requests], [r.k for r in requests]
            )
        return [d.propose(r.context, r.k) for d, r in zip(drafters, requests, strict=True)]

    def _read(self, requests: list[DraftRequest]) -> None:
        pairs = [(self._drafters.get(r.session), r.context) for r in requests]
        models = [(d, c) for d, c in pairs if isinstance(d, ModelDrafter)]
        if models:
            read_together([d for d, _ in models], [c for _, c in models])
        for drafter, context in pairs:
            if drafter is not None and not isinstance(drafter, ModelDrafter):
                drafter.read(context)

    def _new_drafter(self, slot: int, store: SuffixStore | None = None) -> Drafter:
        spec = self.spec
        return new_drafter(
            self.model, spec.lookup, slot, self.fuzzy_groups, None, spec.tree_width, spec.model,
            store,
        )  # fmt: skip

    def _time_steps(self, group_size: int, context_len: int, steps: int) -> float:
        model = self.model.model
        layers = model.config.num_hidden_layers
        groups = easyspec_groups(layers, group_size, *self.spec.easyspec_exact)
        return statistics.median(decode_step_times(model, context_len, steps, groups))

    def _time_all_reduce(self, numel: int, repeats: int) -> float:
        x = torch.zeros(numel, device=self.model.model.device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            self.tp.all_reduce(x)
            _synchronize(x.device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class WorkerDrafter(Drafter):
    """The Drafter interface over a DrafterWorker (the leader of its group): one request at a
    time, in KV slot 0."""

    name = "worker"

    def __init__(self, worker: DrafterWorker):
        self.worker = worker
        self._open = False

    def start(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.finish()
        self.worker.open_session(0, 0, list(prompt_ids), params)
        self._open = True

    def propose(self, context: list[int], k: int) -> Draft:
        return self.worker.propose([DraftRequest(0, list(context), k)])[0]

    def finish(self) -> None:
        if self._open:
            self.worker.close_session(0)
            self._open = False
