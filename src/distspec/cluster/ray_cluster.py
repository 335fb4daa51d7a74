"""Ray bring-up: one placement group per tensor-parallel group, workers made actors with
explicit ranks, joined in a torch.distributed group (gloo on CPU, NCCL on GPU).

Embedded default: a local Ray instance started here (and stopped on shutdown); an address
joins an existing cluster ("auto" under `ray job submit`, where RAY_ADDRESS also names it).
The target group and each drafter group get placement groups of their own, so drafters run
on resources apart from the target's and a drafter's TP size may differ from the target's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from dataclasses import dataclass, field, replace
from typing import Any

from distspec.workers.drafter import DrafterSpec, DrafterWorker
from distspec.workers.group import GroupSpec
from distspec.workers.remote import Remote
from distspec.workers.target import TargetSpec, TargetWorker

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0
HEALTH_TIMEOUT_S = 30.0
RENDEZVOUS_TRIES = 3
# Workers exchange token ids and small drafts through Ray, never weights or logits.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2


@dataclass
class ClusterConfig:
    target: TargetSpec = field(default_factory=TargetSpec)
    target_tp: int = 1
    drafter: DrafterSpec | None = field(default_factory=DrafterSpec)  # None: no drafters
    drafter_tp: int = 1
    num_drafters: int = 1
    address: str | None = None  # None: start a local Ray instance
    cpus_per_rank: float = 1.0  # CPU bundles (where the two below do not say); GPUs: 1 each
    # CPUs per target rank; None: on a local instance every core the drafters do not take
    # (split over the TP ranks: `distspec serve --mode ar` decodes on every core), else
    # cpus_per_rank
    target_cpus: float | None = None
    drafter_cpus: float | None = None  # CPUs per drafter rank; None: cpus_per_rank

    def __post_init__(self) -> None:
        for name in ("target_tp", "drafter_tp", "num_drafters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("cpus_per_rank", "target_cpus", "drafter_cpus"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.drafter is not None:  # a session drafts in the KV slot it has on the target
            self.drafter = replace(self.drafter, num_slots=self.target.num_slots)

    @property
    def gpu(self) -> bool:
        return self.target.device.startswith("cuda")


@dataclass
class WorkerGroup:
    """A TP group of actors; the leader takes the calls, the others follow it."""

    name: str
    actors: list[Any]
    follow_refs: list[Any]
    placement_group: Any
    cls: type | None = None  # what it runs, to rebuild it
    spec: Any = None

    @property
    def leader(self) -> Remote:
        return Remote.ray(self.actors[0])

    def followers_gone(self) -> bool:
        """A follower left follow(): its process died, or the group broke under it (a dead
        leader closes the group's connections). Instant: no call to any actor."""
        import ray

        if not self.follow_refs:
            return False
        ready, _ = ray.wait(self.follow_refs, num_returns=1, timeout=0)
        return bool(ready)

    def healthy(self, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
        """Every rank still in the group and the leader answering (it answers after the
        call it is running, if any)."""
        import ray

        if self.followers_gone():
            return False
        try:
            return bool(ray.get(self.actors[0].ready.remote(), timeout=timeout_s))
        except Exception:  # died, or hung
            return False


class RayCluster:
    def __init__(self, config: ClusterConfig):
        import ray

        self.config = config
        self._started_ray = not ray.is_initialized()
        # under `ray job submit` RAY_ADDRESS names the job's cluster: join it
        address = config.address or os.environ.get("RAY_ADDRESS") or None
        local = self._started_ray and address is None
        # group name -> (CPUs per rank, the cores each rank is pinned to: [] unpinned)
        self.plan = plan_cpus(config, sorted(os.sched_getaffinity(0)) if local else None)
        if self._started_ray:
            if local:
                self._start_local_ray()
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
        self.groups: list[WorkerGroup] = []
        self._lock = threading.Lock()  # groups are rebuilt from more than one thread
        try:
            self.target = self._start_group("target", TargetWorker, config.target, config.target_tp)
            self.drafters = []
            if config.drafter is not None:
                for i in range(config.num_drafters):
                    group = self._start_group(
                        f"drafter-{i}", DrafterWorker, config.drafter, config.drafter_tp
                    )
                    self.drafters.append(group)
        except BaseException:
            self.shutdown()
            raise

    def _start_local_ray(self) -> None:
        """A local instance; a raylet that fails to come up in time (seen on loaded small
        machines, right after another instance stopped) gets one more try."""
        import ray

        for attempt in range(2):
            try:
                ray.init(
                    num_cpus=self._local_cpus(),
                    object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
                return
            except Exception as e:
                ray.shutdown()
                if attempt:
                    raise
                log.warning("the local Ray instance did not start (%s); trying again", e)

    def _local_cpus(self) -> int:
        """Logical CPUs for a local instance: at least what the ranks ask for, even on a small
        machine (ranks then share cores, which is what a laptop test of TP=2 means)."""
        c = self.config
        tp = {"target": c.target_tp}
        asked = sum(cpus * tp.get(name, c.drafter_tp) for name, (cpus, _) in self.plan.items())
        return max(os.cpu_count() or 1, int(asked + 0.999))

    def placement(self) -> str:
        """Where each group computes, in one line (the start-up line, /metrics)."""
        parts = []
        for name, (cpus, cores) in self.plan.items():
            tp = self.config.target_tp if name == "target" else self.config.drafter_tp
            where = f" on cores {' | '.join(_cores(c) for c in cores)}" if cores else ""
            parts.append(f"{name}: {tp} rank(s) x {cpus:g} CPU{where}")
        return "; ".join(parts)

    def _start_group(self, name: str, cls: type, spec: Any, tp: int) -> WorkerGroup:
        """A TP group's actors, ready. The rendezvous port is found free, then bound by rank
        0 a moment later: another process may take it meanwhile (Ray opens many connections),
        and the group then starts again on a fresh one."""
        for attempt in range(RENDEZVOUS_TRIES):
            try:
                return self._start_group_once(name, cls, spec, tp)
            except Exception as e:
                if "EADDRINUSE" not in str(e) or attempt == RENDEZVOUS_TRIES - 1:
                    raise
                log.warning("%s: its rendezvous port was taken; starting it again", name)
        raise AssertionError("unreachable")

    def _start_group_once(self, name: str, cls: type, spec: Any, tp: int) -> WorkerGroup:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        gpu = self.config.gpu
        cpus, cores = self.plan[name]
        bundle = {"CPU": cpus, **({"GPU": 1} if gpu else {})}
        pg = placement_group([bundle] * tp, strategy="STRICT_PACK" if gpu else "PACK")
        ray.get(pg.ready(), timeout=READY_TIMEOUT_S)
        init = None
        if tp > 1:
            host, port = self._rendezvous(pg)
            init = f"tcp://{host}:{port}"
        actor_cls = ray.remote(cls)
        spec = replace(spec, threads=spec.threads or max(1, int(cpus)))
        actors = []
        for rank in range(tp):
            strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)
            group = GroupSpec(rank, tp, init, "nccl" if gpu else "gloo")
            actor = actor_cls.options(
                scheduling_strategy=strategy,
                num_cpus=cpus,
                num_gpus=1 if gpu else 0,
            ).remote(replace(spec, cpus=cores[rank] if cores else ()), group)
            actors.append(actor)
        group = WorkerGroup(name, actors, [], pg, cls, spec)
        with self._lock:
            self.groups.append(group)
        try:
            ray.get([a.ready.remote() for a in actors], timeout=READY_TIMEOUT_S)
        except Exception:
            self._stop_group(group, graceful=False)
            raise
        group.follow_refs = [a.follow.remote() for a in actors[1:]]
        log.info("%s: %d rank(s) ready", name, tp)
        return group

    def rebuild(self, group: WorkerGroup) -> WorkerGroup:
        """A broken group's actors killed and its placement freed, then a new group of the
        same kind and size (fresh processes, empty KV caches) in its place."""
        log.warning("%s: rebuilding its %d rank(s)", group.name, len(group.actors))
        self._stop_group(group, graceful=False)
        new = self._start_group(group.name, group.cls, group.spec, len(group.actors))
        with self._lock:
            if self.target is group:
                self.target = new
            self.drafters = [new if g is group else g for g in self.drafters]
        return new

    def _rendezvous(self, pg: Any) -> tuple[str, int]:
        """A free port on the node of the group's rank 0: found here when that is this node
        (no task to start: seconds on a small machine), else by a task placed there."""
        import ray
        from ray.util.placement_group import placement_group_table
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        first_node = placement_group_table(pg)["bundles_to_node_id"][0]
        if first_node == ray.get_runtime_context().get_node_id():
            return _rendezvous()
        on_first = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        task = ray.remote(_rendezvous).options(scheduling_strategy=on_first, num_cpus=0)
        return ray.get(task.remote())

    def shutdown(self) -> None:
        import ray

        for group in list(self.groups):
            self._stop_group(group, graceful=True)
        if self._started_ray and ray.is_initialized():
            ray.shutdown()

    def _stop_group(self, group: WorkerGroup, graceful: bool) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if graceful and group.follow_refs:
            try:
                ray.get(group.actors[0].leave.remote(), timeout=30)
                ray.get(group.follow_refs, timeout=30)
            except Exception as e:  # a broken group: killing its actors is all that is left
                log.warning("%s did not leave its group cleanly: %s", group.name, e)
        for actor in group.actors:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(actor)
        try:
            remove_placement_group(group.placement_group)
        except Exception as e:
            log.warning("%s: could not free its placement group: %s", group.name, e)
        with self._lock:
            self.groups = [g for g in self.groups if g is not group]


def plan_cpus(config: ClusterConfig, cores: list[int] | None) -> dict[str, tuple[float, list]]:
    """Group name -> (CPUs per rank, the cores each rank is pinned to). cores: this machine's,
    for a local instance (None: a cluster, where Ray places the ranks and nothing is pinned).
    Locally the target takes every core the drafters do not; ranks are pinned to cores of
    their own, target first, when whole cores go round."""
    c = config
    drafters = [f"drafter-{i}" for i in range(c.num_drafters)] if c.drafter else []
    drafter_cpus = c.drafter_cpus or c.cpus_per_rank
    target_cpus = c.target_cpus
    if target_cpus is None:
        target_cpus = c.cpus_per_rank
        if cores is not None:
            free = len(cores) - len(drafters) * c.drafter_tp * drafter_cpus
            target_cpus = max(c.cpus_per_rank, free // c.target_tp)
    sizes = [("target", target_cpus, c.target_tp)]
    sizes += [(d, drafter_cpus, c.drafter_tp) for d in drafters]
    whole = all(float(cpus).is_integer() for _, cpus, _ in sizes)
    fits = cores is not None and whole and sum(int(n) * tp for _, n, tp in sizes) <= len(cores)
    plan, next_core = {}, 0
    for name, cpus, tp in sizes:
        pinned = []
        if fits and not c.gpu:
            for _ in range(tp):
                pinned.append(tuple(cores[next_core : next_core + int(cpus)]))
                next_core += int(cpus)
        plan[name] = (cpus, pinned)
    return plan


def _cores(cores: tuple[int, ...]) -> str:
    return ",".join(map(str, cores))


def _rendezvous() -> tuple[str, int]:
    """A free port on this node, for the group's torch.distributed rendezvous."""
    import ray

    host = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return host, s.getsockname()[1]
