"""Sessions, KV slots, admission and the batched verify loop.

One loop thread drives every running session in lockstep rounds: each round is ONE batched
target step over all sessions' chunks (ragged lengths), plus drafting on the drafter workers.

- ar: chunk = [newest token];
- sd: the drafters draft first, then the chunk is [newest token, *draft];
- pearl: the chunk [newest token, *pending] goes to the target while the drafters draft
  after the pending tokens, at the same time; then the leader decides (spec_decode/pearl.py).

External sessions (the Speculate RPC: an edge device drafts) offer their draft chunks; a
session joins the next round once its chunk is there, so no session waits on another's
network round trip. With keep_decoding a session also takes plain steps while no chunk is
there; a chunk that arrives after the tokens it predicted were decoded is matched against
them and the rest verified as a draft.

The target leader makes every accept/reject decision with the session's seed: a sampled
token is the target's draw with the noise of the session's seed at that position (one seed per
session, chosen here when the request has none), so a session's output is the same whatever
else is batched, however much is drafted at the current load, and after a repair on new
workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from distspec.models.openmp import release_openmp_pool
from distspec.models.prefix_cache import common_prefix
from distspec.scheduler.metrics import SchedulerMetrics
from distspec.scheduler.session import Session, SessionError
from distspec.scheduler.switch import PLAIN, SpeculationSwitch
from distspec.spec_decode import tree
from distspec.spec_decode.decoding import StepOutput, clip_new_tokens
from distspec.spec_decode.draft_policy import DraftCosts, DraftLengthPolicy, costs_from, ema
from distspec.spec_decode.drafter import EMPTY_DRAFT, Draft
from distspec.spec_decode.pearl import PearlState, pearl_batch_gamma
from distspec.spec_decode.sampling import SamplingParams
from distspec.workers.messages import Decoded, DraftRequest, ForwardItem, ModelInfo
from distspec.workers.remote import Remote
from distspec.workers.repair import Repair, Repairer

log = logging.getLogger(__name__)

MODES = ("ar", "sd", "pearl", "auto")  # auto: sd, pearl or plain rounds, by measured speed


class AdmissionError(RuntimeError):
    """No room for another session now; retry after retry_after_s."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ShuttingDownError(RuntimeError):
    pass


class WorkerFailedError(RuntimeError):
    pass


CHECK_INTERVAL_S = 1.0  # how often an idle loop checks its workers
CLOSE_WAIT_S = 5.0  # how long close() waits for a worker's pending calls


@dataclass
class SchedulerConfig:
    mode: str = "pearl"
    gamma: int = 4  # longest draft per round (PEARL: the cap of the measured gamma)
    max_waiting: int = 16  # sessions queued for a KV slot before admission says no
    max_draft: int = 16  # longest chunk an external drafter may offer
    idle_timeout_s: float = 60.0  # an external session without a chunk this long is ended
    trees: bool = False  # the drafters draft token trees (sd rounds only: PEARL splits chains)
    # plain rounds decode up to this many tokens a session in one target call (vLLM's
    # multi-step scheduling), so the call's round trip and the round's bookkeeping are paid
    # once for them; 1 while sessions wait for a free slot or an external session decodes
    decode_steps: int = 4

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.trees and self.mode == "pearl":
            raise ValueError("token trees run in mode sd or auto, not pearl")
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {self.gamma}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.decode_steps < 1:
            raise ValueError(f"decode_steps must be >= 1, got {self.decode_steps}")


@dataclass
class SchedulerState:
    total_slots: int
    free_slots: int
    running: int  # sessions holding a KV slot
    waiting: int  # sessions queued for one
    slots: dict[int, int] = field(default_factory=dict)  # session id -> slot


@dataclass
class _Timing:
    """Running estimates for PEARL's gamma (t_target / t_draft per token)."""

    step_s: float | None = None
    draft_token_s: float | None = None

    def observe(self, step_s: float, draft_s: float, drafted: float) -> None:
        """step_s: the target's forward; draft_s: the drafters' time for `drafted` tokens
        each (on average)."""
        self.step_s = ema(self.step_s, step_s)
        if drafted:
            self.draft_token_s = ema(self.draft_token_s, draft_s / drafted)


@dataclass
class RoundTimes:
    """Where the scheduler's rounds spend their time, summed (seconds): the whole round, the
    drafters' calls before the target's (sd), the target's call as the scheduler waits on it
    (the worker call: a Ray round trip, or a thread hand-off in one process; PEARL drafts
    inside it) and, inside that, the target's forward. round - drafting - target call is the
    scheduler's own bookkeeping; target call - forward is the call's transport plus the
    target's batching and verifying."""

    rounds: int = 0
    steps: int = 0  # the target's forwards in them (a multi-step plain round has several)
    round_s: float = 0.0
    draft_s: float = 0.0
    target_call_s: float = 0.0
    forward_s: float = 0.0


class Scheduler:
    def __init__(
        self,
        target: Remote,
        drafters: list[Remote],
        info: ModelInfo,
        config: SchedulerConfig | None = None,
        costs: DraftCosts | None = None,
        repairer: Repairer | None = None,
    ):
        """costs: target and drafter timings measured at start-up (see calibrate);
        repairer: replaces failed workers (without one, a failure ends the sessions in flight)."""
        self.config = config or SchedulerConfig()
        self.costs = costs
        if self.config.mode != "ar" and not drafters:
            raise ValueError(f"mode {self.config.mode!r} needs at least one drafter")
        self.target, self.drafters, self.info = target, drafters, info
        self.repairer = repairer
        self._rebuilt: dict[int, Remote] = {}  # rebuilt drafters waiting to take over
        self._cv = threading.Condition()
        self._free_slots = list(range(info.num_slots - 1, -1, -1))
        # what each slot holds (its last prompt, or that and its answer): where prompts go
        self._slot_prompts: dict[int, list[int]] = {}
        self._slot_tenants: dict[int, str] = {}  # whose session each slot served last
        self._waiting: deque[Session] = deque()
        self._running: dict[int, Session] = {}  # owned by the loop thread
        self._next_id = 1
        self._closed = False
        self._admitting = True  # False while draining: sessions in flight go on
        self._timing = _Timing()
        self._reading: list[Future] = []  # drafters' read calls in flight (plain rounds)
        self._session_s: float | None = None  # typical session duration, for retry hints
        self.counters = {
            "rounds": 0,
            "drafts": 0,
            "draft_tokens": 0,
            "accepted_tokens": 0,
            "repairs": 0,  # worker failures repaired
        }
        self.target_busy_s = 0.0  # the target's compute time, summed over steps
        self.times = RoundTimes()
        self.switch = SpeculationSwitch()
        self.metrics = SchedulerMetrics()
        self.metrics.watch(self.load, lambda: self.target_busy_s)
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        release_openmp_pool()  # this thread hands the compute to the scheduler's and the workers'
        self._thread.start()

    # -- API (any thread) ------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        external: bool = False,
        keep_decoding: bool = False,
        tenant: str = "",
    ) -> Session:
        """Queue a request; raises ValueError for a bad one, AdmissionError when full.
        external: its drafts come through offer() (Speculate), not from the drafters;
        keep_decoding: it takes plain steps while no chunk is offered; tenant: who asks
        (a drafter may draft from that tenant's earlier outputs, never another's; "": none)."""
        self._check_request(prompt_ids, params)
        params = params.seeded()  # the target and the drafters draw with the same noise
        stops = set(self.info.eos_token_ids) | set(params.stop_token_ids)
        with self._cv:
            if self._closed or not self._admitting:
                raise ShuttingDownError("the server is shutting down")
            # waiting sessions take the free slots first (and those of finished sessions,
            # freed at the end of the current round); max_waiting more may queue
            freeing = sum(1 for s in self._running.values() if s.finished)
            room = len(self._free_slots) + freeing + self.config.max_waiting
            if len(self._waiting) >= room:
                raise AdmissionError(
                    f"all {self.info.num_slots} sessions are busy and "
                    f"{len(self._waiting)} are waiting",
                    self._retry_after_s(),
                )
            session = Session(self._next_id, list(prompt_ids), params, stops)
            session.external = external
            session.keep_decoding = external and keep_decoding
            session.tenant = tenant
            session.tokens = list(prompt_ids)
            session.stats.prompt_tokens = len(prompt_ids)
            self._next_id += 1
            self._waiting.append(session)
            self._cv.notify_all()
        return session

    def offer(self, session_id: int, position: int, draft: Draft) -> None:
        """An external session's draft chunk, drafted after its first `position` tokens
        (prompt + output); verified in the next round. Raises ValueError if it does not fit."""
        with self._cv:
            s = self._running.get(session_id) or next(
                (w for w in self._waiting if w.id == session_id), None
            )
            if s is None or s.finished or not s.external:
                raise ValueError(f"session {session_id} is not open for drafts")
            # A chunk may follow fewer tokens than are verified (keep_decoding, or a resumed
            # stream): its overlap is matched in _reconcile. A newer chunk replaces one
            # still waiting.
            if position > len(s.tokens):
                raise ValueError(
                    f"the chunk follows {position} tokens but {len(s.tokens)} are verified"
                )
            if position < len(s.prompt_ids):
                raise ValueError(f"the chunk follows {position} tokens, inside the prompt")
            if len(draft) > self.config.max_draft:
                raise ValueError(
                    f"the chunk has {len(draft)} tokens; at most {self.config.max_draft}"
                )
            bad = [t for t in draft.tokens if not 0 <= t < self.info.vocab_size]
            if bad:
                raise ValueError(f"draft token {bad[0]} is outside the vocabulary")
            s.chunk = (position, draft[: self.info.max_len - position])  # what fits
            s.last_offer = time.perf_counter()
            self._cv.notify_all()

    def cancel(self, session_id: int) -> None:
        """Stop a session; its KV slot is free once no step in flight uses it (at most the
        current round)."""
        with self._cv:
            for s in self._waiting:
                if s.id == session_id:
                    self._waiting.remove(s)
                    self._finish_cancelled(s)
                    return
            session = self._running.get(session_id)
            if session is not None:
                session.cancelled.set()
                self._cv.notify_all()

    def set_mode(self, mode: str, tree_width: int | None = None) -> None:
        """Switch ar / sd / pearl / auto (and, given, the drafters' tree width) while no
        session runs (benchmarks compare modes so)."""
        with self._cv:
            self._wait_idle("the mode can change")
            if mode != "ar" and not self.drafters:
                raise ValueError(f"mode {mode!r} needs at least one drafter")
            trees = self.config.trees if tree_width is None else tree_width > 1
            self.config = dataclasses.replace(self.config, mode=mode, trees=trees)
            if tree_width is not None:
                for drafter in self.drafters:
                    drafter.call("set_tree_width", tree_width).result()

    def forget_prefixes(self) -> None:
        """Every KV slot's record goes (models/prefix_cache.py), while no session runs: the
        next prompts start cold (benchmarks give every run the same start so)."""
        with self._cv:
            self._wait_idle("the prefix records can go")
            self._slot_prompts.clear()
            self._slot_tenants.clear()
            for worker in [self.target, *self.drafters]:
                worker.call("forget_prefixes").result()

    def _wait_idle(self, what: str) -> None:
        """Under the lock: until no session runs (they leave the loop a moment after their
        last tokens went out)."""
        if not self._cv.wait_for(lambda: not (self._running or self._waiting), timeout=30):
            raise RuntimeError(f"{what} only while no session runs")

    def state(self) -> SchedulerState:
        with self._cv:
            return SchedulerState(
                total_slots=self.info.num_slots,
                free_slots=len(self._free_slots),
                running=len(self._running),
                waiting=len(self._waiting),
                slots={s.id: s.slot for s in self._running.values()},
            )

    def load(self) -> tuple[int, int]:
        """(sessions generating in a slot, sessions waiting), read together: what admission
        bounds, since a finished session's slot counts as free before the round ends."""
        with self._cv:
            generating = sum(1 for s in self._running.values() if not s.finished)
            return generating, len(self._waiting)

    def stop_admitting(self) -> None:
        """Drain: new sessions are refused with ShuttingDownError; those in flight go on."""
        with self._cv:
            self._admitting = False

    def close(self, reason: str = "the server shut down") -> None:
        """Stop the loop; sessions still open end with ShuttingDownError(reason)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=60)
        for s in list(self._waiting) + list(self._running.values()):
            if not s.finished:
                s.fail(ShuttingDownError(reason))
        # the loop's last calls (close_session, ...) are not awaited: a worker's calls run in
        # order, so one more call returns once they are done; a worker that outlives this
        # scheduler (a test's, a new scheduler's) then sees no late close of a reused id
        for worker in [self.target, *self.drafters]:
            with contextlib.suppress(Exception):  # a dead worker has nothing pending
                worker.call("ready").result(timeout=CLOSE_WAIT_S)

    # -- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        # with a repairer, wake every second even when idle: a dead worker is noticed then
        idle_wait = CHECK_INTERVAL_S if self.repairer is not None else None
        while True:
            died = False
            with self._cv:
                self._end_idle()
                while not self._closed and not self._waiting and not self._has_work():
                    if self._cv.wait(timeout=CHECK_INTERVAL_S if self._running else idle_wait):
                        self._end_idle()
                        continue
                    self._end_idle()
                    # busy rounds need no check: a dead worker fails the round's calls
                    died = self.repairer is not None and self.repairer.broken()
                    if died:
                        break
                if self._closed:
                    return
                new = []
                while self._waiting and self._free_slots:
                    session = self._waiting.popleft()
                    session.slot = self._take_slot(session)
                    self._running[session.id] = session
                    new.append(session)
            try:
                if died:
                    raise WorkerFailedError("a worker process died")
                self._take_back_drafters()
                self._release_done()
                if new:
                    self._start(new)
                ready = [s for s in self._running.values() if self._is_ready(s)]
                if ready:
                    self._round(ready)
                self._release_done()
            except Exception as e:
                self._on_failure(e)

    def _on_failure(self, error: Exception) -> None:
        """A round failed. If a worker broke, it is replaced and every session resumes from
        its verified tokens; otherwise the sessions in flight end with the error."""
        try:
            repair = self.repairer.repair() if self.repairer is not None else None
            if repair is not None:
                log.warning("a worker failed (%s); replaced it, resuming", error)
                self.counters["repairs"] += 1
                if repair.target is not None:
                    self.target = repair.target
                for i, remote in repair.drafters.items():
                    self.drafters[i] = remote
                self._resume(repair)
                return
            log.error("scheduler round failed", exc_info=error)
        except Exception as e:
            log.exception("repairing the workers failed")
            error = e
        for s in list(self._running.values()):
            if not s.finished:
                s.fail(SessionError(f"generation failed on the server: {error}"))
        self._release_done()

    def _resume(self, repair: Repair) -> None:
        """Sessions go on from their verified tokens on the repaired workers: a rebuilt
        target's KV is refilled in one batched step (its verdicts are not used; the next
        round verifies from the newest verified token as always). A target that was not
        replaced keeps its KV: unverified PEARL rows past the verified tokens are
        overwritten by the next round, as after any rejection."""
        resumed, unstarted = [], []
        for s in list(self._running.values()):
            if s.finished or s.cancelled.is_set():
                continue
            s.pearl = PearlState()
            (resumed if s.stats.target_forwards else unstarted).append(s)
            if repair.target is not None:
                self.target.call("open_session", s.id, s.params)
            drafted = not s.external and self.config.mode != "ar"
            if drafted and self._drafter_index(s) in repair.drafters:
                self._open_drafting(s)
        if resumed and repair.target is not None:
            log.info("resuming %d session(s) from their verified tokens", len(resumed))
            items = [
                ForwardItem(s.id, s.slot, 0, s.tokens[:-1], draft=EMPTY_DRAFT) for s in resumed
            ]
            self._step(items, in_round=False)
        if unstarted:
            self._start(unstarted)
        self._release_done()

    def _take_back_drafters(self) -> None:
        """Rebuilt drafters replace their stand-ins (a session's output does not depend on
        who drafts)."""
        if self.repairer is None:
            return
        self._rebuilt.update(self.repairer.rebuilt_drafters())
        for i, remote in list(self._rebuilt.items()):
            users = [
                s
                for s in self._running.values()
                if not s.external and not s.finished and self._drafter_index(s) == i
            ]
            del self._rebuilt[i]
            stand_in, self.drafters[i] = self.drafters[i], remote
            if self.config.mode != "ar":
                for s in users:
                    self._open_drafting(s, remote)
            stand_in.close()
            log.info("drafter %d is back", i)

    def _start(self, sessions: list[Session]) -> None:
        for s in sessions:
            self.target.call("open_session", s.id, s.params)
            if s.external:
                s.last_offer = time.perf_counter()
                continue
            if self.config.mode != "ar":
                self._open_drafting(s)
            if self.config.mode in ("sd", "auto"):
                # decisions from the costs measured at start-up (timing live rounds under
                # load measured worse)
                s.policy = DraftLengthPolicy(self.config.gamma, costs=self.costs)
        items = [
            ForwardItem(s.id, s.slot, 0, s.prompt_ids, draft=EMPTY_DRAFT, reuse=s.reuse)
            for s in sessions
        ]
        verdicts = self._step(items, in_round=False)
        for s, verdict in zip(sessions, verdicts, strict=True):
            s.stats.target_forwards += 1
            s.stats.time_to_first_token_s = time.perf_counter() - s.created
            s.stats.cached_tokens = verdict.cached
            self.metrics.on_first_token(
                s.stats.time_to_first_token_s, len(s.prompt_ids), verdict.cached
            )
            self._advance(s, [verdict.next_token])

    def _round(self, sessions: list[Session]) -> None:
        """One round of the kind the switch picks: for sd and pearl, that or a plain one; for
        auto, sd, pearl or plain, whichever measures fastest at this batch size."""
        internal = [s for s in sessions if not s.external]
        mode = self.config.mode
        adaptive = mode != "ar" and bool(internal)
        kinds = ("sd", "pearl", PLAIN) if mode == "auto" else (mode, PLAIN)
        if self.config.trees:
            kinds = tuple(k for k in kinds if k != "pearl")
        kind = self.switch.choose(len(internal), kinds) if adaptive else PLAIN
        before = sum(s.stats.new_tokens for s in internal)
        t = time.perf_counter()
        self._run_round(sessions, kind)
        round_s = time.perf_counter() - t
        self.times.rounds += 1
        self.times.round_s += round_s
        if adaptive:
            tokens = sum(s.stats.new_tokens for s in internal) - before
            self.switch.observe(len(internal), kind, tokens, round_s)

    def _run_round(self, sessions: list[Session], kind: str) -> None:
        self.counters["rounds"] += 1
        external = [s for s in sessions if s.external]
        sessions = [s for s in sessions if not s.external]
        offered = {}
        for s in external:
            with self._cv:
                taken, s.chunk = s.chunk, None
            s.settling = taken is not None
            offered[s.id] = self._reconcile(s, taken)
        # a plain round of mode pearl verifies what the last PEARL round left pending; with
        # nothing pending it is any plain round (several steps, one call)
        pending = any(s.pearl.pending.tokens for s in sessions)
        pearl = kind == "pearl" or (kind == PLAIN and self.config.mode == "pearl" and pending)
        if pearl and sessions:
            self._pearl_round(sessions, external, offered, plain=kind == PLAIN)
            return
        for s in sessions:  # auto: pending PEARL tokens are unverified; drafted again below
            s.pearl = PearlState()
        drafts, draft_s = dict(offered), 0.0
        sessions = sessions + external
        if kind == "sd":
            requests = {}
            for s in sessions:
                if s.external:
                    continue
                batch = len(sessions)  # verified together in this round's step
                k = min(s.policy.next_k(batch), self._room(s) - 1)
                if k > 0:
                    prices = s.policy.node_prices(k, batch)
                    requests[s.id] = DraftRequest(s.id, s.tokens, k, prices)
            t = time.perf_counter()
            drafts.update(self._draft(sessions, requests))
            draft_s = time.perf_counter() - t
            self.times.draft_s += draft_s
        # plain rounds of a speculative mode: the drafters read what the last rounds verified
        # while the target steps (on their own compute), so that the switch's next sd round
        # drafts at once instead of first catching up on every session
        if kind == PLAIN and self.config.mode != "ar":
            self._read(sessions)
        steps = self._decode_steps(sessions) if kind == PLAIN else 1
        # a tree may hold more nodes than the draft length: cut to what the context holds
        items = [
            _verify_item(
                s, drafts.get(s.id, EMPTY_DRAFT)[: self._room(s) - 1], min(steps, self._room(s))
            )
            for s in sessions
        ]
        t = time.perf_counter()
        verdicts = self._step(items)
        verify_s = time.perf_counter() - t
        for s, item, verdict in zip(sessions, items, verdicts, strict=True):
            k = len(item.draft)
            new = verdict.tokens(item.draft)
            forwards = len(new) if item.steps > 1 else 1
            if s.policy is not None:
                depth = tree.depth(item.draft)
                s.policy.observe_round(depth, verdict.num_accepted, draft_s, verify_s / forwards)
            self._count(s, k, verdict.num_accepted, forwards)
            self._advance(s, new, verdict.num_accepted)

    def _decode_steps(self, sessions: list[Session]) -> int:
        """How many tokens a plain round decodes per session in its one target call."""
        if any(s.external for s in sessions) or (self._waiting and self._free_slots):
            return 1  # an edge client's chunk, or a new session, is not kept waiting
        return self.config.decode_steps

    def _pearl_round(
        self,
        sessions: list[Session],
        external: list[Session],
        offered: dict[int, Draft],
        plain: bool = False,
    ) -> None:
        live_gamma = 0 if plain else self._pearl_gamma(sessions)
        requests = {}
        items = [_verify_item(s, offered[s.id]) for s in external]  # verified at once
        for s in sessions:
            start, chunk = s.pearl.target_chunk(s.tokens)
            items.append(ForwardItem(s.id, s.slot, start, chunk, defer=True))
            context = s.pearl.draft_context(s.tokens)
            k = min(
                live_gamma,
                self._room(s) - len(s.pearl.pending) - 1,
                self.info.max_len - len(context),
            )
            if k > 0:
                requests[s.id] = DraftRequest(s.id, context, k)
        t = time.perf_counter()
        stepping = self.target.call("step", items)  # the target verifies while drafters draft
        drafts = self._draft(sessions, requests)
        draft_s = time.perf_counter() - t
        result = stepping.result()
        # drafting ran inside the target call's wait: the call's time holds both
        self.times.target_call_s += time.perf_counter() - t
        external_verdicts = self._stepped(result)[: len(external)]
        for s, verdict in zip(external, external_verdicts, strict=True):
            draft = offered[s.id]
            self._count(s, len(draft), verdict.num_accepted)
            self._advance(s, verdict.tokens(draft), verdict.num_accepted)
        # per drafter: its sessions are drafted one after another
        per_drafter = sum(len(d) for d in drafts.values()) / len(self.drafters)
        self._timing.observe(result[1], draft_s, per_drafter)
        candidates = {s.id: s.pearl.candidate(drafts.get(s.id, EMPTY_DRAFT)) for s in sessions}
        verdicts = self.target("decide", list(candidates.items()))
        for s, verdict in zip(sessions, verdicts, strict=True):
            self._count(s, len(candidates[s.id]), verdict.num_accepted)
            new = s.pearl.apply(verdict, drafts.get(s.id, EMPTY_DRAFT))
            self._advance(s, new, verdict.num_accepted)

    def _step(self, items: list[ForwardItem], in_round: bool = True) -> list:
        """in_round: a decoding round's step (RoundTimes), not a prefill or a resumption."""
        t = time.perf_counter()
        result = self.target("step", items)
        if in_round:
            self.times.target_call_s += time.perf_counter() - t
        return self._stepped(result, in_round)

    def _stepped(self, result: tuple[list, float], in_round: bool = True) -> list:
        verdicts, forward_s = result
        self.target_busy_s += forward_s
        if in_round:
            self.times.forward_s += forward_s
            decoded = [len(v.new_tokens) for v in verdicts if isinstance(v, Decoded)]
            self.times.steps += max(decoded, default=1)
        return verdicts

    def _pearl_gamma(self, sessions: list[Session]) -> int:
        """PEARL's draft length at this batch. With the start-up costs, the fastest modelled
        round (pearl_batch_gamma). Without: from live timings, drafting a session's gamma
        tokens should take as long as the target's step (this rule counts the drafter call's
        round trip into every token: it kept gamma at 1 for 4 sessions, pearl@4 tau 1.54)."""
        per_drafter = max(1, -(-len(sessions) // len(self.drafters)))
        c = self.costs
        if c is not None and len(c.verify) >= 2 and len(c.draft_batch) >= 2:
            return pearl_batch_gamma(c, self.config.gamma, len(sessions), per_drafter)
        t = self._timing
        if t.step_s is None or not t.draft_token_s:
            return self.config.gamma
        # 0 when drafting one token for each session outlasts the target's step: plain
        # decoding then (large batches on few drafters)
        gamma = int(t.step_s / (t.draft_token_s * per_drafter) + 0.5)
        return max(0, min(self.config.gamma, gamma))

    def _open_drafting(self, s: Session, drafter: Remote | None = None):
        """Open s on its drafter (or on `drafter`, a replacement); the call's future."""
        drafter = drafter or self._drafter(s)
        return drafter.call("open_session", s.id, s.slot, s.prompt_ids, s.params, s.tenant)

    def _read(self, sessions: list[Session]) -> None:
        """Each drafter's read call (DrafterWorker.read) for its internal sessions, not
        waited for: a drafter's calls run in order, so a later draft follows the read. While
        the last reads run, none is sent (their drafters read more tokens at once later)."""
        if any(not f.done() for f in self._reading):
            return
        reading, self._reading = self._reading, []
        for f in reading:
            f.result()  # a drafter that failed reading fails here, as on a draft
        requests = {s.id: DraftRequest(s.id, s.tokens, 0) for s in sessions if not s.external}
        by_drafter = self._by_drafter(sessions, requests)
        self._reading = [self.drafters[i].call("read", reqs) for i, reqs in by_drafter.items()]

    def _by_drafter(
        self, sessions: list[Session], requests: dict[int, DraftRequest]
    ) -> dict[int, list[DraftRequest]]:
        """The sessions' requests grouped by the drafter that serves them."""
        by_drafter: dict[int, list[DraftRequest]] = {}
        for s in sessions:
            if s.id in requests:
                by_drafter.setdefault(self._drafter_index(s), []).append(requests[s.id])
        return by_drafter

    def _draft(
        self, sessions: list[Session], requests: dict[int, DraftRequest]
    ) -> dict[int, Draft]:
        by_drafter = self._by_drafter(sessions, requests)
        futures: list[tuple[list[DraftRequest], Future]] = [
            (reqs, self.drafters[i].call("propose", reqs)) for i, reqs in by_drafter.items()
        ]
        drafts = {}
        for reqs, future in futures:
            for req, draft in zip(reqs, future.result(), strict=True):
                drafts[req.session] = draft
        return drafts

    # -- bookkeeping -----------------------------------------------------------------------

    def _has_work(self) -> bool:
        return any(self._is_ready(s) or s.cancelled.is_set() for s in self._running.values())

    def _is_ready(self, s: Session) -> bool:
        return not s.finished and (not s.external or s.keep_decoding or s.chunk is not None)

    def _end_idle(self) -> None:
        """End external sessions that offered no chunk for idle_timeout_s (under the lock)."""
        now = time.perf_counter()
        for s in self._running.values():
            idle = s.external and not s.keep_decoding and s.chunk is None and s.last_offer
            if idle and now - s.last_offer > self.config.idle_timeout_s and not s.finished:
                s.idle = True
                s.cancelled.set()

    def _reconcile(self, s: Session, chunk: tuple[int, Draft] | None) -> Draft:
        """The part of an offered chunk still to verify: its tokens up to the verified length
        must be the verified ones (keep_decoding sessions decode while chunks travel)."""
        if chunk is None:
            return EMPTY_DRAFT
        position, draft = chunk
        seen = s.tokens[position:]
        if draft.tokens[: len(seen)] != seen:
            return EMPTY_DRAFT  # it predicted a different continuation: dropped
        return draft[len(seen) :]

    def _take_slot(self, s: Session) -> int:
        """The free slot whose last prompt starts as s's does for longest (workers reuse those
        K/V: models/prefix_cache.py), among those its tenant used last (never another
        tenant's: a prompt's time to first token would tell what others sent); of equals, one
        no other tenant served last, then the one freed last."""
        free, prompt = self._free_slots, s.prompt_ids

        def shared(i: int) -> tuple[int, bool, int]:
            owner = self._slot_tenants.get(free[i], s.tenant)  # unused: nobody's
            held = self._slot_prompts.get(free[i], []) if owner == s.tenant else []
            # then a slot no other tenant holds a prompt in (theirs may come back)
            return common_prefix(held, prompt, len(prompt)), owner == s.tenant, i

        slot = free.pop(max(range(len(free)), key=shared))
        s.reuse = self._slot_tenants.get(slot) == s.tenant
        self._slot_prompts[slot], self._slot_tenants[slot] = prompt, s.tenant
        return slot

    def _drafter_index(self, s: Session) -> int:
        """Sessions are spread over the drafters by KV slot."""
        return s.slot % len(self.drafters)

    def _drafter(self, s: Session) -> Remote:
        return self.drafters[self._drafter_index(s)]

    def _room(self, s: Session) -> int:
        return min(s.params.max_new_tokens - s.produced, self.info.max_len - len(s.tokens))

    def _count(self, s: Session, num_draft: int, accepted: int, forwards: int = 1) -> None:
        s.stats.target_forwards += forwards
        s.stats.count_verdict(num_draft, accepted)
        self.metrics.on_verdict(num_draft, accepted)
        if num_draft:
            self.counters["drafts"] += 1
            self.counters["draft_tokens"] += num_draft
            self.counters["accepted_tokens"] += accepted

    def _advance(self, s: Session, new: list[int], accepted: int = 0) -> None:
        new, finish = clip_new_tokens(new, self._room(s), s.stops)
        position = len(s.tokens)
        now = time.perf_counter()
        self.metrics.on_tokens(len(new), now - s.last_emit if s.last_emit else None)
        s.last_emit = now
        s.tokens += new
        s.stats.new_tokens += len(new)
        if finish:
            s.finish_reason = finish
            s.stats.wall_s = time.perf_counter() - s.created
            self._session_s = ema(self._session_s, s.stats.wall_s)
        stats = s.stats if finish else None
        s.emit(StepOutput(new, finish, stats, accepted, s.settling, position))
        s.settling = False

    def _release_done(self) -> None:
        """Free the KV slots of finished and cancelled sessions (no step is in flight)."""
        done = [s for s in self._running.values() if s.finished or s.cancelled.is_set()]
        for s in done:
            # after a round the slot holds the K/V of every verified token but the newest: a
            # later turn of the chat (this prompt, this answer, more) runs only what is new
            held = s.tokens[:-1] if s.finish_reason in ("stop", "length") else []
            self.target.call("close_session", s.id, s.slot, held)
            if held:
                self._slot_prompts[s.slot] = held
            if self.config.mode != "ar" and not s.external:
                self._drafter(s).call("close_session", s.id)
            if not s.finished:
                self._finish_cancelled(s)
        with self._cv:
            for s in done:
                del self._running[s.id]
                self._free_slots.append(s.slot)
            if done:
                self._cv.notify_all()

    def _finish_cancelled(self, s: Session) -> None:
        s.finish_reason = "cancelled"
        s.stats.wall_s = time.perf_counter() - s.created
        s.emit(StepOutput([], "cancelled", s.stats))

    def _retry_after_s(self) -> float:
        typical = self._session_s or 1.0
        return round(max(0.1, typical * (len(self._waiting) + 1) / self.info.num_slots), 2)

    def _check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.info.max_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; the context holds {self.info.max_len}"
            )
        bad = [t for t in prompt_ids if not 0 <= t < self.info.vocab_size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is outside the vocabulary (0..{self.info.vocab_size - 1})"
            )


def _verify_item(s: Session, draft: Draft, steps: int = 1) -> ForwardItem:
    """The chunk [newest verified token, *draft], to verify in the step itself; steps: plain
    decoding of up to that many tokens in the one call (none past the session's room)."""
    steps = 1 if len(draft) else max(1, steps)
    stops = frozenset(s.stops) if steps > 1 else frozenset()
    tokens = [s.tokens[-1], *draft.tokens]
    return ForwardItem(s.id, s.slot, len(s.tokens) - 1, tokens, draft, steps=steps, stops=stops)


def calibrate(target: Remote, drafter: Remote, info: ModelInfo, k: int) -> DraftCosts | None:
    """Measure the target's step and verify costs and the drafter's cost per token once, at
    start-up (before sessions use the KV slots)."""
    # the target up to every session's chunk at once: the draft length follows the batch
    timing = target("calibrate", k, min(info.num_slots, 16) * (k + 1))
    if timing is None:
        return None
    t_draft, prior_alpha, together = drafter("calibrate", k, info.vocab_size)
    costs = costs_from(tuple(map(tuple, timing)), t_draft, prior_alpha)
    return dataclasses.replace(costs, draft_batch=tuple(map(tuple, together)))
