"""Separate compute: target and drafter on cores of their own, read back from the workers."""

from __future__ import annotations

import os

import pytest

from distspec.cluster.ray_cluster import ClusterConfig, plan_cpus
from distspec.engine import Engine, EngineConfig
from distspec.spec_decode.sampling import SamplingParams
from distspec.workers.drafter import DrafterSpec
from distspec.workers.placement import CpuPlacement, current_placement, split_cpus
from distspec.workers.target import TargetSpec
from test_decoding import greedy_ar

CORES = sorted(os.sched_getaffinity(0))
needs_two = pytest.mark.skipif(len(CORES) < 2, reason="pinning apart needs 2 cores")


def test_split_cpus_gives_the_drafter_the_last_cores():
    assert split_cpus(1, [0, 1]) == CpuPlacement((0,), (1,))
    assert split_cpus(2, [0, 1, 2, 3]) == CpuPlacement((0, 1), (2, 3))
    for bad in (0, 2, 5):
        with pytest.raises(ValueError, match="drafter cpus must be between 1 and 1"):
            split_cpus(bad, [0, 1])
    assert str(CpuPlacement((0, 1), (2,))) == "target on cores 0,1, drafter on cores 2"


def _cluster(**kw) -> ClusterConfig:
    return ClusterConfig(**{"target": TargetSpec("t"), "drafter": DrafterSpec("d", "t"), **kw})


@pytest.mark.parametrize(
    "config, cores, plan",
    [
        # one machine: the target takes every core the drafter does not
        (_cluster(), [0, 1], {"target": (1, [(0,)]), "drafter-0": (1, [(1,)])}),
        (_cluster(), [0, 1, 2, 3], {"target": (3, [(0, 1, 2)]), "drafter-0": (1, [(3,)])}),
        (_cluster(drafter=None), [0, 1], {"target": (2, [(0, 1)])}),  # serve --mode ar
        (
            _cluster(target_tp=2),
            [0, 1, 2, 3, 4],
            {"target": (2, [(0, 1), (2, 3)]), "drafter-0": (1, [(4,)])},
        ),
        (
            _cluster(drafter_cpus=2),
            [0, 1, 2, 3],
            {"target": (2, [(0, 1)]), "drafter-0": (2, [(2, 3)])},
        ),
        # more ranks than cores (a laptop test of TP 2): shared, not pinned
        (_cluster(target_tp=2), [0, 1], {"target": (1, []), "drafter-0": (1, [])}),
        (_cluster(cpus_per_rank=0.5), [0, 1], {"target": (1, []), "drafter-0": (0.5, [])}),
        # a cluster: Ray places the ranks, nothing is pinned
        (_cluster(), None, {"target": (1, []), "drafter-0": (1, [])}),
        (_cluster(target_cpus=4), None, {"target": (4, []), "drafter-0": (1, [])}),
    ],
)
def test_plan_cpus(config, cores, plan):
    assert plan_cpus(config, cores) == plan


def test_bad_cpu_counts_are_refused():
    with pytest.raises(ValueError, match="target_cpus must be > 0"):
        _cluster(target_cpus=0)


@needs_two
def test_on_target_pins_the_calling_thread_and_puts_it_back():
    before = current_placement()
    placement = split_cpus(1)
    with placement.on_target():
        assert current_placement() == (placement.target, len(placement.target))
    assert current_placement() == before


@needs_two
def test_generate_with_the_drafter_on_a_core_of_its_own(tiny_dir, target):
    engine = Engine(
        EngineConfig(target=str(tiny_dir), mode="pearl", drafter="self", drafter_cpus=1, gamma=3)
    )
    try:
        assert engine.drafter.placement() == ((CORES[-1],), 1)
        ids = target.tokenizer.encode("abcabc")
        steps = list(engine.stream(ids, SamplingParams(max_new_tokens=24)))
        assert [t for s in steps for t in s.token_ids] == greedy_ar(target, ids, 24)
    finally:
        engine.close()


def test_drafter_cpus_need_a_drafter_here(tiny_dir):
    with pytest.raises(ValueError, match="drafter cpus need a drafter"):
        EngineConfig(target=str(tiny_dir), mode="ar", drafter_cpus=1)
