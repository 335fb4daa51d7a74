"""A generation request as the scheduler tracks it, and what its consumer reads."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from distspec.spec_decode.decoding import GenerationStats, StepOutput
from distspec.spec_decode.draft_policy import DraftLengthPolicy
from distspec.spec_decode.drafter import Draft
from distspec.spec_decode.pearl import PearlState
from distspec.spec_decode.sampling import SamplingParams


class SessionError(RuntimeError):
    """The session ended because of a failure on the server (not the request's fault)."""


WAKE = object()  # put on a session's outputs to wake readers a newer stream has replaced
EPOCH_POLL_S = 0.25  # a replaced reader notices within this, should another take its WAKE


@dataclass
class Session:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    stops: set[int]
    external: bool = False  # drafts come from offer() (Speculate), not the drafter workers
    keep_decoding: bool = False  # plain steps while no chunk is offered (external only)
    tenant: str = ""  # whose outputs it may draft from (suffix); "": its own only
    chunk: tuple[int, Draft] | None = None  # (position, draft) offered, until verified
    settling: bool = False  # this round took the offered chunk
    last_offer: float | None = None
    idle: bool = False  # ended for offering no chunk within the idle timeout
    timed_out: bool = False  # cancelled for running past the server's request timeout
    epoch: int = 0  # streams attached so far (a resumed stream takes over)
    slot: int = -1  # KV slot in target and drafter; -1 while waiting for one
    reuse: bool = False  # its slot's last session was its tenant's: the prompt may reuse K/V
    tokens: list[int] = field(default_factory=list)  # verified: prompt + output
    stats: GenerationStats = field(default_factory=GenerationStats)
    pearl: PearlState = field(default_factory=PearlState)
    policy: DraftLengthPolicy | None = None
    finish_reason: str | None = None  # stop | length | cancelled | error
    created: float = field(default_factory=time.perf_counter)
    last_emit: float | None = None  # when its latest tokens went out
    cancelled: threading.Event = field(default_factory=threading.Event)
    outputs: queue.Queue = field(default_factory=queue.Queue)

    @property
    def produced(self) -> int:
        return len(self.tokens) - len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def emit(self, step: StepOutput) -> None:
        self.outputs.put(step)

    def fail(self, error: Exception) -> None:
        self.finish_reason = "error"
        self.outputs.put(error)

    def wake_readers(self) -> None:
        """A newer reader attached (epoch): the older ones stop now, not at the next step."""
        self.outputs.put(WAKE)

    def _hand_back(self, item) -> None:
        """Return an item to the front of outputs (a later step may be queued behind it)."""
        q = self.outputs
        with q.mutex:
            q.queue.appendleft(item)
            q.unfinished_tasks += 1
            q.not_empty.notify()

    def _next(self, timeout_s: float | None, epoch: int | None):
        """The next item of outputs; with an epoch, WAKE once a newer reader attached."""
        if epoch is None:
            return self.outputs.get(timeout=timeout_s)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait = EPOCH_POLL_S
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - time.monotonic()))
            try:
                return self.outputs.get(timeout=wait)
            except queue.Empty:
                if epoch != self.epoch:
                    return WAKE
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    def stream(
        self, timeout_s: float | None = None, epoch: int | None = None
    ) -> Iterator[StepOutput]:
        """The session's steps until the last one (finish_reason set); raises SessionError if
        the server failed it. Leaving the loop early does not cancel: call Scheduler.cancel.
        epoch: stop (handing the item back) once a newer reader attached (a resumed stream)."""
        while True:
            item = self._next(timeout_s, epoch)
            stale = epoch is not None and epoch != self.epoch
            if item is WAKE:
                if stale:
                    return
                continue
            if stale:
                self._hand_back(item)
                return
            if isinstance(item, Exception):
                raise item
            yield item
            if item.finish_reason is not None:
                return
