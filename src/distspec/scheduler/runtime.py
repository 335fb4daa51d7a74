"""The serving runtime: workers (Ray actors, or in-process objects), calibration, scheduler."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch

from distspec.cluster.ray_cluster import ClusterConfig, RayCluster
from distspec.models.loader import load_tokenizer
from distspec.models.openmp import release_openmp_pool
from distspec.models.tokenizer import Tokenizer
from distspec.scheduler.scheduler import Scheduler, SchedulerConfig, calibrate
from distspec.workers.remote import Remote

log = logging.getLogger(__name__)


@dataclass
class RuntimeConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    use_ray: bool = True  # False: workers in this process (TP 1; tests, single-process use)

    def __post_init__(self) -> None:
        c = self.cluster
        if not self.use_ray and (c.target_tp > 1 or c.drafter_tp > 1):
            raise ValueError("tensor parallelism needs Ray (use_ray=True)")
        if self.scheduler.mode != "ar" and c.drafter is None:
            raise ValueError(f"mode {self.scheduler.mode!r} needs a drafter")


class Runtime:
    def __init__(self, config: RuntimeConfig):
        self.config = config
        c = config.cluster
        self.cluster: RayCluster | None = None
        self._local: list[Remote] = []
        drafter_spec = c.drafter if config.scheduler.mode != "ar" else None
        if config.use_ray:
            self.cluster = RayCluster(c if drafter_spec else replace(c, drafter=None))
            target = self.cluster.target.leader
            drafters = [g.leader for g in self.cluster.drafters]
        else:
            from distspec.workers.drafter import DrafterWorker
            from distspec.workers.target import TargetWorker

            target = Remote.local(TargetWorker(c.target))
            drafters = []
            if drafter_spec:
                drafters = [
                    Remote.local(DrafterWorker(drafter_spec)) for _ in range(c.num_drafters)
                ]
            self._local = [target, *drafters]
            release_openmp_pool()  # loaded here; they compute on their own threads
        self.target, self.drafters = target, drafters
        self.info = target("model_info")
        costs = None
        if drafters:
            costs = calibrate(target, drafters[0], self.info, config.scheduler.gamma)
            log.info("measured costs: %s", costs)
        self.costs = costs
        repairer = None
        if self.cluster is not None:
            from distspec.cluster.recovery import ClusterRepairer

            repairer = ClusterRepairer(self.cluster)
        self.scheduler = Scheduler(
            target, drafters, self.info, config.scheduler, costs, repairer=repairer
        )
        if self.cluster is not None:
            self.scheduler.metrics.set_placement(self.cluster.plan)
        tokenizer, _ = load_tokenizer(c.target.model)
        self.tokenizer: Tokenizer = tokenizer

    def placement(self) -> str:
        """Where the workers compute, in one line."""
        if self.cluster is not None:
            return self.cluster.placement()
        return f"every worker in this process ({torch.get_num_threads()} torch threads)"

    def close(self) -> None:
        self.scheduler.close()
        for remote in self._local:
            remote.close()
        if self.cluster is not None:
            self.cluster.shutdown()
