"""workers/openmp.py: a thread that hands its compute on frees its OpenMP pool (whose threads
would otherwise push GNU OpenMP into its sleep-between-regions mode), and a local worker's
calls do so after each call."""

import os
import threading

import pytest
import torch

from distspec.models.openmp import release_openmp_pool
from distspec.workers.remote import Remote


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def parallel_work() -> None:
    torch.randn(1 << 20).mul(2.0)  # large enough for a parallel region


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def in_thread(fn):
    out = []
    th = threading.Thread(target=lambda: out.append(fn()))
    th.start()
    th.join()
    return out[0]


def test_releasing_frees_the_calling_threads_pool(two_threads):
    def work_then_release():
        torch.set_num_threads(2)
        parallel_work()
        with_pool = os_threads()
        released = release_openmp_pool()
        return with_pool, released, os_threads()

    with_pool, released, after = in_thread(work_then_release)
    assert released
    assert after < with_pool  # the pool's worker threads ended


def test_a_local_workers_calls_leave_no_pool_behind(two_threads):
    class Worker:
        def work(self):
            torch.set_num_threads(2)
            parallel_work()
            return os_threads()

    remote = Remote.local(Worker())
    try:
        remote("work")  # starts the executor's thread
        during = remote("work")
        after = os_threads()
        assert after < during
        assert remote("work") == during  # and the next call makes its pool again
    finally:
        remote.close()
