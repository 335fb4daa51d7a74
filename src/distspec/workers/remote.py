"""Calls on a worker that return futures, whether the worker is a Ray actor or a local object.

Calls on one worker run one at a time, in the order they were made (as Ray runs an actor's
calls), so the scheduler drives both kinds the same way and unit tests need no Ray.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from distspec.models.openmp import call_then_release


class Remote:
    def __init__(self, worker: Any, actor: bool = False):
        """worker: a plain worker object, or a Ray actor handle (actor=True)."""
        self.worker, self.actor = worker, actor
        self._thread = None if actor else ThreadPoolExecutor(1, thread_name_prefix="worker")

    @classmethod
    def local(cls, worker: Any) -> Remote:
        return cls(worker)

    @classmethod
    def ray(cls, handle: Any) -> Remote:
        return cls(handle, actor=True)

    def call(self, method: str, *args: Any) -> Future:
        if self.actor:
            # no task events: Ray's GCS would keep a record of every call (thousands a
            # second with small models), which grows its memory for nothing
            call = getattr(self.worker, method).options(enable_task_events=False)
            return call.remote(*args).future()
        return self._thread.submit(call_then_release, getattr(self.worker, method), *args)

    def __call__(self, method: str, *args: Any) -> Any:
        """Call and wait for the result."""
        return self.call(method, *args).result()

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)
