"""Repairs a RayCluster for the scheduler (workers/repair.py): a broken target group is
rebuilt at once (its sessions wait, then resume); a broken drafter group is stood in for by
prompt lookup in the scheduler's process at once, rebuilt in the background and handed back
when ready, so drafting degrades instead of stopping."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

from distspec.cluster.ray_cluster import RayCluster, WorkerGroup
from distspec.workers.drafter import DrafterWorker
from distspec.workers.remote import Remote
from distspec.workers.repair import Repair

log = logging.getLogger(__name__)


class ClusterRepairer:
    def __init__(self, cluster: RayCluster):
        self.cluster = cluster
        self._lock = threading.Lock()
        self._rebuilding: set[int] = set()  # drafter indices being rebuilt
        self._rebuilt: dict[int, Remote] = {}

    def broken(self) -> bool:
        return any(g.followers_gone() for g in self.cluster.groups)

    def repair(self) -> Repair | None:
        cluster, repair = self.cluster, Repair()
        if not cluster.target.healthy():
            repair.target = cluster.rebuild(cluster.target).leader
        for i, group in enumerate(list(cluster.drafters)):
            with self._lock:
                if i in self._rebuilding:
                    continue
            if group.healthy():
                continue
            log.warning("%s failed: prompt lookup drafts until it is rebuilt", group.name)
            repair.drafters[i] = Remote.local(DrafterWorker(_lookup_spec(group)))
            with self._lock:
                self._rebuilding.add(i)
            threading.Thread(
                target=self._rebuild_drafter, args=(i, group), name=f"rebuild-{group.name}"
            ).start()
        if repair.target is None and not repair.drafters:
            return None
        return repair

    def rebuilt_drafters(self) -> dict[int, Remote]:
        with self._lock:
            ready, self._rebuilt = self._rebuilt, {}
        return ready

    def _rebuild_drafter(self, index: int, group: WorkerGroup) -> None:
        try:
            new = self.cluster.rebuild(group)
        except Exception:  # the stand-in keeps drafting; a later failure check retries
            log.exception("%s could not be rebuilt", group.name)
            with self._lock:
                self._rebuilding.discard(index)
            return
        with self._lock:
            self._rebuilding.discard(index)
            self._rebuilt[index] = new.leader


def _lookup_spec(group: WorkerGroup):
    """The failed drafter's spec, as prompt lookup: no model, in the scheduler's process."""
    return replace(group.spec, model="ngram", parallel="tensor", easyspec_group=0, threads=None)
