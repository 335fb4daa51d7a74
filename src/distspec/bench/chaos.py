"""`distspec bench-chaos`: N streaming clients held against a server while faults are
injected on a schedule; per fault, what the clients saw.

The runtime (a real local Ray cluster: the target on `target_tp` ranks, one drafter actor)
and the gRPC server run in this process, so the harness holds the actor handles it kills;
the clients talk real gRPC over 127.0.0.1. Every request is greedy (temperature 0) over the
benchmark prompts, so every completed answer is checked token for token against a greedy
reference computed once before the load starts (the local engine, plain decoding; cached in
OUT/chaos-reference.json for the same model, prompts and limits).

Clients: `clients - edge_clients` loop on streaming Generate; `edge_clients` draft locally
(the edge drafter) and stream drafts over Speculate through a DelayRelay (RTT edge_rtt_ms),
so link drops are real. A client retries its request after a clear status (RESOURCE_EXHAUSTED
after the retry hint, any other code after a short backoff), as a real client would, and
goes on to the next prompt once it completes.

Faults (chaos_config.FAULT_KINDS), at fault_interval_s, 2 * fault_interval_s, ..., round-robin
over the kinds; each also waits until the previous one has recovered, settle_s ago:
- kill-target-rank / kill-target-leader: ray.kill a target rank; recovered once the
  scheduler repaired (rebuilt the group) and tokens flow again;
- kill-drafter: ray.kill the drafter actor; recovered once the scheduler repaired (prompt
  lookup stands in) and tokens flow; the drafter, rebuilt in the background (holding no later
  fault back, as the runtime repairs other workers meanwhile), must be back by the end;
- drop-edge: relay.drop(); recovered once an edge client gets tokens on a resumed stream (or
  any edge tokens, when no edge stream was open);
- stall-reader: a bad actor opens a streaming Generate of stall_tokens tokens and stops
  reading; expected: the server's stall timeout ends the call with DEADLINE_EXCEEDED;
- hostile-chunks: a bad actor opens Speculate sessions and sends an out-of-vocabulary chunk,
  a chunk past the verified tokens and an oversized one; expected: INVALID_ARGUMENT each.
Bad actors are counted apart from the load; their statuses are checked against the expected.

Per fault, in its window (from the fault until it recovered, plus settle_s; at most until the
next fault): requests completed, ended with a clear status (by code), LOST (the stream ended
without a final message and without a status, or hung until the client's deadline, or never
ended: must be 0), WRONG (a completed answer that differs from the reference: must be 0), the
time until tokens flow again, and p99 TTFT / ITL against the fault-free baseline (the first
interval, after warmup_s). Requests count in the window in which they ended; TTFT where the
first token arrived, ITL where each token arrived.

Output: the table (format_table), OUT/chaos.json and OUT/chaos.png (tokens/s over time with
the faults marked). The run fails (report.ok False, exit code 1) when anything was lost or
wrong, a fault did not recover, or a bad actor got another status than expected.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from tqdm import tqdm

from distspec.bench.chaos_config import ChaosConfig
from distspec.bench.grpc_client import chat_request, generate_stub
from distspec.bench.reference import first_difference, greedy_references
from distspec.bench.streams import Streamed, add_chunk, percentile, scaled, stream_generate
from distspec.datasets import load_prompts
from distspec.server.gateway import Gateway
from distspec.v1 import speculative_decoding_pb2 as pb

log = logging.getLogger(__name__)

ERROR_BACKOFF_S = 0.5  # after a clear status other than a refusal
DEFAULT_RETRY_S = 0.5  # a refusal without a hint
POLL_S = 0.05  # how often the monitor reads the scheduler's repairs
LATE_SLACK_S = 1.0  # a fault waiting for the one before may start this late past its slot
ARRIVAL_DISORDER = 256  # token arrivals of different threads out of order, at most
# the stalled reader's request (raw text): counting on, an answer that does not end soon
STALL_PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
# the stalled reader's window: the server blocks on flow control within ~80 responses
STALL_OPTIONS = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
STALL_SLACK_S = 1.0  # the stalled reader reads again this long after the server's cut is due
BAD_ACTOR_TIMEOUT_S = 60.0  # a bad actor's calls, beyond the stall it waits for
REFUSAL_RETRIES_S = 30.0  # a bad actor refused for a full server tries again this long
DRAIN_GRACE_S = 30.0  # after the clients' deadline, for threads still running
FINISH_CODES = {  # the edge client's finish reasons, as the wire's
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}


@dataclass
class RequestRecord:
    client: int
    kind: str  # generate | edge
    prompt: int  # index into the prompts
    sent_s: float  # s since the run started
    ended_s: float
    outcome: str  # completed | status | lost
    code: str | None  # the status (outcome status), e.g. UNAVAILABLE; CANCELLED: a cancel finish
    details: str
    tokens: int
    ttft_s: float | None
    wrong_at: int | None = None  # completed but not the reference: the first token that differs
    reconnects: int = 0  # edge: broken streams resumed
    chunks: list[tuple[float, int]] = field(default_factory=list, repr=False)  # (s, tokens)

    @property
    def first_token_s(self) -> float | None:
        return self.chunks[0][0] if self.chunks else None

    def gaps(self) -> list[tuple[float, float]]:
        """(arrival s, inter-token gap s) per token after the first chunk."""
        out = []
        for (previous, _), (t, n) in zip(self.chunks, self.chunks[1:], strict=False):
            out += [(t, (t - previous) / n)] * n
        return out


@dataclass
class BadActorResult:
    kind: str  # stall-reader | hostile-chunks
    expected: list[str]  # a status per call
    got: list[str]
    ok: bool
    detail: str = ""
    done_s: float | None = None  # s since the start: when the bad actor was done


@dataclass
class WindowStats:
    start_s: float
    end_s: float
    completed: int
    statuses: dict[str, int]  # code -> requests that ended with it
    lost: int
    wrong: int
    tokens_per_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None


@dataclass
class FaultResult:
    kind: str
    scheduled_s: float
    t_s: float | None  # injected at (s since the start); None: never injected
    detail: str  # what was done, or why it was not
    window: WindowStats | None
    repaired_s: float | None  # kills: from the fault to the scheduler's repair
    drafter_back_s: float | None  # kill-drafter: to the rebuilt drafter taking over
    tokens_again_s: float | None  # to the first tokens after the fault (kills: after repair)
    edge_open: int  # drop-edge: edge streams open at the drop
    edge_resumed: int  # drop-edge: edge streams resumed in the window
    bad_actor: BadActorResult | None
    recovered: bool


@dataclass
class ChaosReport:
    config: ChaosConfig
    server: dict
    reference: dict
    baseline: WindowStats
    faults: list[FaultResult]
    totals: dict
    lost: list[dict]  # every lost request, and why
    wrong: list[dict]  # every wrong answer: where it differs
    timeline: dict  # 1 s bins: t_s, tokens_per_s (all clients), edge_tokens_per_s
    requests: list[RequestRecord]
    wall_s: float
    machine: dict
    ok: bool
    problems: list[str]  # why not ok

    def to_dict(self) -> dict:
        data = asdict(self)
        for r in data["requests"]:
            r.pop("chunks")
        return data


# ---------------------------------------------------------------------------------------------
# the run


def run_chaos_bench(config: ChaosConfig) -> ChaosReport:
    import torch

    # one torch thread in this process: the reference, then the edge drafters, share the
    # machine with the server's workers (more threads than free cores spin and crawl)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(config)
    finally:
        torch.set_num_threads(threads)


def _run(config: ChaosConfig) -> ChaosReport:
    from distspec.models.loader import load_tokenizer
    from distspec.models.tokenizer import ChatMessage

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}
    prompts = load_prompts(config.prompts_file, config.num_prompts)
    tokenizer, _ = load_tokenizer(config.target)
    ids = [tokenizer.encode_chat([ChatMessage("user", p)]) for p in prompts]
    longest = max(len(x) for x in ids)
    if longest >= config.max_len:
        raise ValueError(f"a prompt has {longest} tokens; max_len {config.max_len} is too short")
    reference, reference_info = _reference(config, ids, out)
    drafters = _edge_drafters(config)
    t = time.monotonic()
    runtime, server, gateway, relay = _serve(config)
    start_s = time.monotonic() - t
    try:
        harness = _Harness(config, runtime, gateway, server.port, relay, prompts, reference)
        harness.drafters = drafters
        with _first_lines_only():
            harness.run()
        server_info = {
            "address": harness.address,
            "relay": relay.address,
            "target_tp": config.target_tp,
            "repairs": runtime.scheduler.counters["repairs"],
            "max_draft": runtime.scheduler.config.max_draft,
            "vocab_size": runtime.info.vocab_size,
            "start_s": round(start_s, 1),  # the runtime and the server, ready
        }
    finally:
        with contextlib.suppress(Exception):
            relay.stop()
        server.stop(grace_s=1)
        runtime.close()
    machine["loadavg_end"] = os.getloadavg()
    report = _report(config, harness, server_info, reference_info, machine)
    (out / "chaos.json").write_text(json.dumps(report.to_dict(), indent=1))
    plot_chaos(report, out / "chaos.png")
    return report


class _FirstLine(logging.Filter):
    """Log records cut to their first line (a failed Ray call's message holds the remote
    traceback: dozens of lines for every fault injected)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\n" in message:
            record.msg, record.args = message.split("\n", 1)[0] + " [...]", None
        record.exc_info = record.exc_text = None
        return True


@contextlib.contextmanager
def _first_lines_only():
    """While the faults run, unless logging at INFO (-v): one line per log record."""
    handlers = logging.getLogger().handlers if not log.isEnabledFor(logging.INFO) else []
    cut = _FirstLine()
    for handler in handlers:
        handler.addFilter(cut)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(cut)


def _reference(config: ChaosConfig, ids: list[list[int]], out: Path) -> tuple[list, dict]:
    """The greedy answers, from the cache when it holds them for these very inputs."""
    from distspec.models.loader import resolve_model_dir

    model_dir = resolve_model_dir(config.target)
    files = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.iterdir() if p.is_file()
    )
    key_data = [str(model_dir), files, ids, config.max_new_tokens, config.max_len]
    key = hashlib.sha256(json.dumps(key_data).encode()).hexdigest()
    path = out / "chaos-reference.json"
    info = {"prompts": len(ids), "path": str(path), "cached": False}
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached = json.loads(path.read_text())
        if cached["key"] == key:
            answers = cached["answers"]
            info |= {"cached": True, "tokens": sum(map(len, answers)), "seconds": 0.0}
            return answers, info
    t = time.monotonic()
    with tqdm(total=len(ids), desc="greedy reference", unit="prompt") as bar:
        answers = greedy_references(
            config.target, ids, config.max_new_tokens, config.max_len, progress=bar.update
        )
    info |= {"tokens": sum(map(len, answers)), "seconds": round(time.monotonic() - t, 1)}
    path.write_text(json.dumps({"key": key, "answers": answers}))
    return answers, info


def _edge_drafters(config: ChaosConfig) -> list:
    from distspec.spec_decode.drafters.factory import load_drafter, new_drafter

    name = config.edge_drafter or config.drafter
    return [
        new_drafter(load_drafter(name, config.target, max_len=config.max_len), name=name)
        for _ in range(config.edge_clients)
    ]


class WatchedGateway(Gateway):
    """A Gateway that hands the sessions of a watched prompt to a callback: the harness
    learns when the stalled reader's session has finished on the server."""

    watch: tuple[list[int], Callable] | None = None  # (prompt ids, callback(session))

    def submit(self, client, prompt_ids, *args, **kwargs):
        session = super().submit(client, prompt_ids, *args, **kwargs)
        watch = self.watch
        if watch is not None and list(prompt_ids) == watch[0]:
            watch[1](session)
        return session


def _serve(config: ChaosConfig):
    from distspec.bench.relay import DelayRelay
    from distspec.scheduler.runtime import Runtime
    from distspec.server.grpc_server import GrpcServer
    from distspec.server.serve import ServeConfig

    serve = ServeConfig(
        port=0,
        host="127.0.0.1",
        use_ray=True,
        target=config.target,
        target_tp=config.target_tp,
        drafter=config.drafter,
        mode=config.mode,
        gamma=config.gamma,
        num_slots=config.num_slots,
        max_len=config.max_len,
        max_waiting=config.max_waiting,
        cpus_per_rank=config.cpus_per_rank,
        resume_timeout_s=config.resume_timeout_s,
        stall_timeout_s=config.stall_timeout_s,
    )
    t = time.monotonic()
    print("bench-chaos: starting the runtime on a local Ray cluster", flush=True)
    runtime = Runtime(serve.runtime_config())
    try:
        gateway = WatchedGateway(runtime, None, serve.request_timeout_s, serve.stall_timeout_s)
        server = GrpcServer(
            runtime,
            serve.port,
            serve.host,
            resume_timeout_s=serve.resume_timeout_s,
            gateway=gateway,
        )
        port = server.start()
    except BaseException:
        runtime.close()
        raise
    relay = DelayRelay(f"127.0.0.1:{port}", delay_s=config.edge_rtt_ms / 2000).start()
    log.info("bench-chaos: serving on 127.0.0.1:%d after %.1f s", port, time.monotonic() - t)
    return runtime, server, gateway, relay


# ---------------------------------------------------------------------------------------------
# the harness


@dataclass
class _Fault:
    kind: str
    scheduled: float  # s since the start
    t: float | None = None  # monotonic, when injected
    detail: str = ""
    repairs_before: int = 0
    edge_open: int = 0
    bad_actor: BadActorResult | None = None
    bad_thread: threading.Thread | None = None


class _Harness:
    def __init__(self, config, runtime, gateway, port, relay, prompts, reference):
        self.config, self.runtime, self.gateway, self.relay = config, runtime, gateway, relay
        self.address = f"127.0.0.1:{port}"
        self.prompts, self.reference = prompts, reference
        self.drafters: list = []
        self.scheduler = runtime.scheduler
        self.records: list[RequestRecord] = []
        self.arrivals: list[tuple[float, int, bool]] = []  # (monotonic, tokens, edge)
        self.open: dict[int, float] = {}  # client -> when its open request was sent
        self.edge_resumes: list[float] = []  # monotonic: a resumed edge stream opened
        self.repairs: list[float] = []  # monotonic: the scheduler counted a repair
        self.drafter_back: list[float] = []  # monotonic: a rebuilt drafter took over
        self.faults = [_Fault(kind, offset) for offset, kind in config.schedule()]
        self.stop = threading.Event()  # the clients start no new request
        self.finished = threading.Event()  # the monitor and the injector end
        self.t0 = 0.0
        self.slip_s = 0.0  # how far faults waiting for the one before moved the schedule
        self.t_end = 0.0
        self.hung: list[RequestRecord] = []

    # -- the run -------------------------------------------------------------------------

    def run(self) -> None:
        from distspec.edge_client import EdgeClient

        config = self.config
        n_edge = config.edge_clients
        channels = [grpc.insecure_channel(self.address) for _ in range(config.clients - n_edge)]
        harness = self

        class ObservedEdgeClient(EdgeClient):
            def _run(self, responses, requests, run):  # each stream of a request
                if run.resumes:
                    harness.edge_resumes.append(time.monotonic())
                return super()._run(responses, requests, run)

        edges = [
            ObservedEdgeClient(
                self.relay.address,
                drafter,
                gamma=config.gamma,
                overlap=True,
                timeout_s=config.request_timeout_s,
            )
            for drafter in self.drafters
        ]
        try:
            for channel in channels:
                grpc.channel_ready_future(channel).result(timeout=60)
            self.t0 = time.monotonic()
            self.deadline = self.t0 + config.duration_s
            threads = [
                threading.Thread(
                    target=self._generate_client,
                    args=(i, generate_stub(c)),
                    name=f"chaos-client-{i}",
                    daemon=True,
                )
                for i, c in enumerate(channels)
            ]
            threads += [
                threading.Thread(
                    target=self._edge_client,
                    args=(len(channels) + j, e),
                    name=f"chaos-edge-{j}",
                    daemon=True,
                )
                for j, e in enumerate(edges)
            ]
            monitor = threading.Thread(target=self._monitor, name="chaos-monitor", daemon=True)
            injector = threading.Thread(target=self._inject_all, name="chaos-faults", daemon=True)
            for th in [monitor, *threads, injector]:
                th.start()
            try:
                self._progress(threads)
            finally:
                self.stop.set()
                limit = time.monotonic() + config.request_timeout_s + DRAIN_GRACE_S
                for th in threads:
                    th.join(timeout=max(0.0, limit - time.monotonic()))
                self._count_hung()
                self.finished.set()
                injector.join(timeout=10)
                for f in self.faults:
                    if f.bad_thread is not None:
                        f.bad_thread.join(timeout=BAD_ACTOR_TIMEOUT_S + config.request_timeout_s)
                monitor.join(timeout=5)
                self.t_end = time.monotonic()
        finally:
            for channel in channels:
                channel.close()
            for e in edges:
                e.close()

    def _progress(self, threads: list[threading.Thread]) -> None:
        """Until the clients are done (at most the drain's limit past the deadline)."""
        bar = tqdm(total=round(self.config.duration_s), desc="bench-chaos", unit="s")
        shown = 0
        drain_s = self.config.request_timeout_s + DRAIN_GRACE_S
        while any(th.is_alive() for th in threads) and time.monotonic() < self.deadline + drain_s:
            time.sleep(1.0)
            now = time.monotonic()
            bar.total = round(self.deadline - self.t0)
            if now >= self.deadline:
                self.stop.set()
                bar.set_description("bench-chaos (draining)")
            recent = sum(n for t, n, _ in self.arrivals[-2000:] if t > now - 5)
            done = list(self.records)
            injected = [f for f in self.faults if f.t is not None]
            bar.set_postfix(
                done=sum(r.outcome == "completed" for r in done),
                tok_s=f"{recent / 5:.1f}",
                status=sum(r.outcome == "status" for r in done),
                lost=sum(r.outcome == "lost" for r in done),
                wrong=sum(r.wrong_at is not None for r in done),
                faults=f"{len(injected)}/{len(self.faults)}"
                + (f" {injected[-1].kind}" if injected else ""),
            )
            step = round(min(now, self.deadline) - self.t0) - shown
            if step > 0:
                bar.update(step)
                shown += step
        bar.close()

    def _rel(self, t: float) -> float:
        return t - self.t0

    # -- clients ---------------------------------------------------------------------------

    def _running(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.deadline

    def _generate_client(self, index: int, stub) -> None:
        config = self.config
        k = index
        on_chunk = lambda t, n: self.arrivals.append((t, n, False))  # noqa: E731
        while self._running():
            p = k % len(self.prompts)
            request = chat_request(self.prompts[p], config.max_new_tokens, 0.0)
            self.open[index] = time.monotonic()
            try:
                r = stream_generate(stub, request, config.request_timeout_s, on_chunk)
            except Exception as e:  # not a status: the stream broke in the client
                log.exception("client %d", index)
                r = Streamed(sent=self.open[index], ended=time.monotonic())
                r.details = f"{type(e).__name__}: {e}"
                record = self._add(index, "generate", p, r, lost=f"client error: {r.details}")
            else:
                record = self._add(index, "generate", p, r)
            finally:
                self.open.pop(index, None)
            k, wait = self._next(k, record, r.retry_after_s)
            if wait:
                self.stop.wait(min(wait, max(0.0, self.deadline - time.monotonic())))

    def _edge_client(self, index: int, client) -> None:
        from distspec.spec_decode.sampling import SamplingParams

        config = self.config
        params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=0.0)
        k = index
        while self._running():
            p = k % len(self.prompts)
            r = Streamed(sent=time.monotonic())
            self.open[index] = r.sent
            on_chunk = lambda t, n: self.arrivals.append((t, n, True))  # noqa: E731
            reconnects, lost = 0, None
            try:
                for step in client.generate(params, messages=[("user", self.prompts[p])]):
                    add_chunk(r, list(step.token_ids), on_chunk)
                    if step.finish_reason is not None:
                        r.finish_reason = FINISH_CODES[step.finish_reason]
                        reconnects = step.stats.reconnects if step.stats else 0
            except grpc.RpcError as e:
                r.code, r.details = e.code(), e.details() or ""
            except Exception as e:  # a protocol failure in the client: no status
                log.exception("edge client %d", index)
                lost = f"client error: {type(e).__name__}: {e}"
            finally:
                self.open.pop(index, None)
            r.ended = time.monotonic()
            record = self._add(index, "edge", p, r, lost=lost, reconnects=reconnects)
            k, wait = self._next(k, record, None)
            if wait:
                self.stop.wait(min(wait, max(0.0, self.deadline - time.monotonic())))

    def _next(self, k: int, record: RequestRecord, hint: float | None) -> tuple[int, float]:
        """(the next prompt counter, seconds to wait): a completed request moves on, a clear
        status retries the same prompt after a wait."""
        if record.outcome == "completed":
            return k + 1, 0.0
        if record.outcome == "lost":
            return k + 1, ERROR_BACKOFF_S
        if record.code == "RESOURCE_EXHAUSTED":
            return k, DEFAULT_RETRY_S if hint is None else hint
        return k, ERROR_BACKOFF_S

    def _add(
        self,
        client: int,
        kind: str,
        prompt: int,
        r: Streamed,
        lost: str | None = None,
        reconnects: int = 0,
    ) -> RequestRecord:
        """Classify a request that ended and keep it."""
        code, details, wrong_at = None, r.details, None
        if lost is not None:
            outcome, details = "lost", lost
        elif r.code is not None:
            hung = r.code == grpc.StatusCode.DEADLINE_EXCEEDED and (
                r.ended - r.sent >= self.config.request_timeout_s - 1.0
            )
            outcome, code = ("lost", None) if hung else ("status", r.code.name)
            if hung:
                details = f"hung until the client's deadline ({self.config.request_timeout_s:g} s)"
        elif r.finish_reason is None:
            outcome = "lost"
            details = "the stream ended without a final message and without a status"
        elif r.finish_reason == pb.FINISH_REASON_CANCELLED:
            outcome, code, details = "status", "CANCELLED", "the server cancelled it (a final)"
        else:
            outcome = "completed"
            wrong_at = first_difference(r.token_ids, self.reference[prompt])
        record = RequestRecord(
            client=client,
            kind=kind,
            prompt=prompt,
            sent_s=self._rel(r.sent),
            ended_s=self._rel(r.ended),
            outcome=outcome,
            code=code,
            details=details[:300],
            tokens=len(r.token_ids),
            ttft_s=r.ttft_s,
            wrong_at=wrong_at,
            reconnects=reconnects,
            chunks=[(self._rel(t), n) for t, n in r.chunks],
        )
        self.records.append(record)
        return record

    def _count_hung(self) -> None:
        """Requests still open after the drain never ended: LOST."""
        now = time.monotonic()
        for client, sent in list(self.open.items()):
            record = RequestRecord(
                client=client,
                kind="edge"
                if client >= self.config.clients - self.config.edge_clients
                else "generate",
                prompt=-1,
                sent_s=self._rel(sent),
                ended_s=self._rel(now),
                outcome="lost",
                code=None,
                details=f"never ended ({now - sent:.0f} s after it was sent)",
                tokens=0,
                ttft_s=None,
            )
            self.records.append(record)
            self.hung.append(record)

    # -- the monitor -----------------------------------------------------------------------

    def _monitor(self) -> None:
        counters = self.scheduler.counters
        repairs = counters["repairs"]
        remote = self.scheduler.drafters[0] if self.scheduler.drafters else None
        while not self.finished.wait(POLL_S):
            now = time.monotonic()
            if counters["repairs"] > repairs:
                self.repairs += [now] * (counters["repairs"] - repairs)
                repairs = counters["repairs"]
            current = self.scheduler.drafters[0] if self.scheduler.drafters else None
            if current is not remote:
                if current is not None and current.actor:
                    self.drafter_back.append(now)
                remote = current

    # -- faults ----------------------------------------------------------------------------

    def _inject_all(self) -> None:
        previous: _Fault | None = None
        for fault in self.faults:
            while not self.finished.is_set():
                now = time.monotonic()
                at = self.t0 + fault.scheduled + self.slip_s
                if now >= at and (previous is None or self._settled(previous, now)):
                    break
                if now > at + LATE_SLACK_S:
                    self._slip(now - at - LATE_SLACK_S)
                self.finished.wait(POLL_S)
            at = self.t0 + fault.scheduled + self.slip_s
            # the schedule's last slot leaves this long before the end (see schedule())
            last_start = self.deadline - max(self.config.settle_s, self.config.fault_interval_s / 2)
            now = time.monotonic()
            if self.finished.is_set() or now > max(last_start, at) + LATE_SLACK_S:
                late = ""
                if previous is not None and not self._settled(previous, now):
                    late = f"; {previous.kind} had not recovered"
                fault.detail = f"not injected: no time left before the end{late}"
                continue
            try:
                self._inject(fault)
            except Exception as e:
                log.exception("injecting %s", fault.kind)
                fault.detail = f"the injection failed: {type(e).__name__}: {e}"
                fault.t = None
                continue
            previous = fault

    def _slip(self, by_s: float) -> None:
        """The schedule and the clients' end move back (max_slip_s in all)."""
        by_s = min(by_s, self.config.max_slip_s - self.slip_s)
        if by_s > 0:
            self.slip_s += by_s
            self.deadline += by_s

    def _settled(self, fault: _Fault, now: float) -> bool:
        """The fault has recovered, settle_s ago at least."""
        rec = self._recovery(fault, now)
        if not rec["recovered"]:
            return False
        marks = [m for m in (rec["repaired"], rec["tokens_again"], rec["drafter_back"]) if m]
        return now >= max(marks, default=fault.t) + self.config.settle_s

    def _inject(self, fault: _Fault) -> None:
        import ray

        fault.repairs_before = self.scheduler.counters["repairs"]
        cluster = self.runtime.cluster
        kind = fault.kind
        if kind in ("kill-target-rank", "kill-target-leader"):
            actors = cluster.target.actors
            rank = len(actors) - 1 if kind == "kill-target-rank" else 0
            fault.t = time.monotonic()
            ray.kill(actors[rank], no_restart=True)
            fault.detail = f"killed target rank {rank} of {len(actors)}"
        elif kind == "kill-drafter":
            fault.t = time.monotonic()
            ray.kill(cluster.drafters[0].actors[0], no_restart=True)
            fault.detail = "killed the drafter actor"
        elif kind == "drop-edge":
            fault.edge_open = sum(
                1 for c in list(self.open) if c >= self.config.clients - self.config.edge_clients
            )
            fault.t = time.monotonic()
            self.relay.drop()
            fault.detail = f"dropped the relay's connections ({fault.edge_open} edge streams open)"
        else:
            target = self._stall_reader if kind == "stall-reader" else self._hostile_chunks
            fault.t = time.monotonic()
            fault.bad_thread = threading.Thread(
                target=self._bad_actor, args=(fault, target), name=f"chaos-{kind}", daemon=True
            )
            fault.bad_thread.start()
            fault.detail = (
                f"a Generate of {self.config.stall_tokens} tokens that stops reading"
                if kind == "stall-reader"
                else "Speculate chunks: out-of-vocabulary ids, past the verified tokens, oversized"
            )

    def _bad_actor(self, fault: _Fault, run) -> None:
        try:
            fault.bad_actor = run()
        except Exception as e:
            log.exception("%s", fault.kind)
            fault.bad_actor = BadActorResult(fault.kind, [], [f"{type(e).__name__}"], False, str(e))
        fault.bad_actor.done_s = self._rel(time.monotonic())

    def _stall_reader(self) -> BadActorResult:
        """Read one response, then stop reading: the client grants a 1 KiB window and no
        more while it does not read, so the server's sends block within ~80 responses (the
        session itself runs on to its end: the scheduler never waits on a reader) and its
        stall timeout must end the call. The client sees that only when it reads again (the
        status waits behind the unread responses), so it reads again once the server must
        have cut it (see _wait_for_the_cut; the gateway hands the harness the session):
        DEADLINE_EXCEEDED ("took no response") expected."""
        config = self.config
        expected = ["DEADLINE_EXCEEDED"]
        sessions: list = []
        self.gateway.watch = (self.runtime.tokenizer.encode(STALL_PROMPT), sessions.append)
        channel = grpc.insecure_channel(self.address, options=STALL_OPTIONS)
        try:
            stub = generate_stub(channel)
            request = pb.GenerateRequest(prompt=STALL_PROMPT, max_new_tokens=config.stall_tokens)
            call, first, stopped = self._first_response(
                lambda: stub.Generate(request, timeout=config.request_timeout_s)
            )
            self.gateway.watch = None
            if isinstance(call, str):
                return BadActorResult("stall-reader", expected, [call], False, first)
            finished = self._wait_for_the_cut(sessions, stopped)
            try:
                for _ in call:
                    pass
                got, details = "OK", "the whole answer came: it fit in the client's window"
            except grpc.RpcError as e:
                got, details = e.code().name, e.details() or ""
            ok = got == "DEADLINE_EXCEEDED" and "took no response" in details
            waited = time.monotonic() - stopped
            ended = "did not end" if finished is None else f"ended after {finished - stopped:.1f} s"
            detail = (
                f"{details[:160]} (read again {waited:.1f} s after it stopped; its session {ended})"
            )
            return BadActorResult("stall-reader", expected, [got], ok, detail)
        finally:
            self.gateway.watch = None
            channel.close()

    def _wait_for_the_cut(self, sessions: list, stopped: float) -> float | None:
        """Until the server must have cut the stalled call: its session has finished and its
        stream has taken no step from the session's queue for the stall timeout (the stream
        sends each step it takes at once, so it has been blocked on flow control that long,
        or it has taken them all and the whole answer fit in the client's window). Returns
        when the session finished (monotonic; None: it did not, in time)."""
        config = self.config
        give_up = stopped + config.request_timeout_s / 2
        finished = last = None
        since = time.monotonic()
        while (now := time.monotonic()) < give_up:
            session = sessions[-1] if sessions else None
            if session is not None:
                if finished is None and session.finished:
                    finished = now
                left = session.outputs.qsize()  # steps the stream has not taken yet
                if left != last:
                    last, since = left, now
                elif finished is not None and now - since >= config.stall_timeout_s + STALL_SLACK_S:
                    break
            time.sleep(POLL_S)
        return finished

    def _hostile_chunks(self) -> BadActorResult:
        vocab = self.runtime.info.vocab_size
        max_draft = self.scheduler.config.max_draft
        # (name, (position, token ids) of the chunk for a prompt of n tokens)
        cases = [
            ("out-of-vocabulary ids", lambda n: (n, [vocab + 7])),
            ("past the verified tokens", lambda n: (n + 10_000, [1])),
            ("oversized", lambda n: (n, [1] * (max_draft + 1))),
        ]
        got, details = [], []
        channel = grpc.insecure_channel(self.address)
        try:
            stub = generate_stub(channel)
            for name, chunk in cases:
                code, detail = self._hostile_call(stub, chunk)
                got.append(code)
                details.append(f"{name}: {code} ({detail[:80]})")
        finally:
            channel.close()
        expected = ["INVALID_ARGUMENT"] * len(cases)
        return BadActorResult("hostile-chunks", expected, got, got == expected, "; ".join(details))

    def _hostile_call(self, stub, chunk) -> tuple[str, str]:
        requests: queue.Queue = queue.Queue()
        open_ = pb.OpenSession(messages=[pb.ChatMessage(role="user", content=self.prompts[0])])
        # stop and wait (no keep_decoding): the session takes no step without a chunk
        open_.sampling.max_new_tokens = self.config.max_new_tokens

        def start():
            requests.put(pb.SpeculateRequest(open=open_))
            return stub.Speculate(iter(requests.get, None), timeout=BAD_ACTOR_TIMEOUT_S)

        call, first, _ = self._first_response(start)
        try:
            if isinstance(call, str):
                return call, first
            position, tokens = chunk(len(first.opened.prompt_token_ids))
            draft = pb.DraftChunk(position=position, token_ids=tokens)
            requests.put(pb.SpeculateRequest(draft=draft))
            try:
                for _ in call:
                    pass
                return "OK", "the stream ended without a status"
            except grpc.RpcError as e:
                return e.code().name, e.details() or ""
        finally:
            requests.put(None)
            if not isinstance(call, str):
                call.cancel()

    def _first_response(self, start):
        """(call, its first response, when it came), retrying the refusals of a full server
        for a while; on another status (or none): (code name, details, None)."""
        give_up = time.monotonic() + REFUSAL_RETRIES_S
        while True:
            call = start()
            try:
                first = next(call)
                return call, first, time.monotonic()
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > give_up:
                    return e.code().name, e.details() or "", None
                time.sleep(DEFAULT_RETRY_S)
            except StopIteration:
                return "OK", "the stream ended without a response", None

    def _recovery(
        self, fault: _Fault, until: float | None = None, back_until: float | None = None
    ) -> dict:
        """When the fault was repaired, tokens flowed again (within `until`) and the drafter
        came back (within `back_until`, default `until`): monotonic, None for not (yet);
        and whether it has recovered: tokens flow again (after the repair). A drafter still
        rebuilding in the background holds no fault back (the runtime rebuilds one while it
        repairs others); one not back by the end of the run is a failure of its own."""
        t, kind = fault.t, fault.kind
        until = time.monotonic() if until is None else until
        back_until = until if back_until is None else back_until
        out = {"repaired": None, "tokens_again": None, "drafter_back": None, "recovered": False}
        if t is None:
            return out
        killed = kind.startswith("kill-")
        after = t
        if killed:
            done = [r for r in self.repairs if r >= t and r <= until]
            if not done:
                return out
            out["repaired"] = after = done[0]
        if kind == "kill-drafter":
            back = [b for b in self.drafter_back if t <= b <= back_until]
            out["drafter_back"] = back[0] if back else None
        edge_only = kind == "drop-edge"
        if edge_only and fault.edge_open:
            resumed = [r for r in self.edge_resumes if t <= r <= until]
            if not resumed:
                return out
            after = resumed[0]
        first = self._first_arrival(after, until, edge_only)
        out["tokens_again"] = first
        # (nor does a bad actor still at it: its verdict comes later)
        out["recovered"] = first is not None
        return out

    def _first_arrival(self, after: float, until: float, edge_only: bool) -> float | None:
        """The first token arrival in [after, until] (of an edge client, with edge_only).
        Arrivals are appended by many threads, so in order but for a few neighbours."""
        arrivals = self.arrivals
        i = max(0, bisect.bisect_left(arrivals, (after,)) - ARRIVAL_DISORDER)
        for t, _, edge in itertools.islice(arrivals, i, None):
            if t > until + 1.0:  # past it, disorder included
                break
            if after <= t <= until and (edge or not edge_only):
                return t
        return None


# ---------------------------------------------------------------------------------------------
# the report


def _window(records: list[RequestRecord], start: float, end: float) -> WindowStats:
    ended = [r for r in records if start <= r.ended_s < end]
    statuses = Counter(r.code for r in ended if r.outcome == "status")
    ttft = [
        r.ttft_s for r in records if r.first_token_s is not None and start <= r.first_token_s < end
    ]
    itl = [g for r in records for t, g in r.gaps() if start <= t < end]
    tokens = sum(n for r in records for t, n in r.chunks if start <= t < end)
    return WindowStats(
        start_s=round(start, 2),
        end_s=round(end, 2),
        completed=sum(r.outcome == "completed" for r in ended),
        statuses=dict(statuses),
        lost=sum(r.outcome == "lost" for r in ended),
        wrong=sum(r.wrong_at is not None for r in ended),
        tokens_per_s=tokens / (end - start) if end > start else 0.0,
        ttft_p50_s=percentile(ttft, 50),
        ttft_p99_s=percentile(ttft, 99),
        itl_p50_ms=scaled(percentile(itl, 50), 1000),
        itl_p99_ms=scaled(percentile(itl, 99), 1000),
    )


def _report(config, h: _Harness, server: dict, reference: dict, machine: dict) -> ChaosReport:
    records = sorted(h.records, key=lambda r: r.ended_s)
    end = h._rel(h.t_end)
    injected = [f for f in h.faults if f.t is not None]
    first = h._rel(injected[0].t) if injected else config.duration_s
    baseline = _window(records, config.warmup_s, first)
    results = []
    for i, f in enumerate(h.faults):
        if f.t is None:
            none = dict(window=None, repaired_s=None, drafter_back_s=None, tokens_again_s=None)
            results.append(
                FaultResult(
                    f.kind,
                    f.scheduled,
                    None,
                    f.detail,
                    **none,
                    edge_open=0,
                    edge_resumed=0,
                    bad_actor=f.bad_actor,
                    recovered=False,
                )
            )
            continue
        later = [g.t for g in h.faults[i + 1 :] if g.t is not None]
        limit = later[0] if later else h.t_end
        rec = h._recovery(f, until=limit, back_until=h.t_end)
        marks = [rec["repaired"], rec["tokens_again"], rec["drafter_back"]]
        if f.bad_actor is not None and f.bad_actor.done_s is not None:
            marks.append(h.t0 + f.bad_actor.done_s)
        recovered_at = max((m for m in marks if m is not None), default=f.t)
        w_end = min(limit, recovered_at + config.settle_s) if rec["recovered"] else limit
        window = _window(records, h._rel(f.t), h._rel(max(w_end, f.t + 1e-3)))
        resumed = [r for r in h.edge_resumes if f.t <= r < h.t0 + window.end_s]
        bad_ok = f.bad_actor is None or f.bad_actor.ok
        drafter_ok = f.kind != "kill-drafter" or rec["drafter_back"] is not None
        since = lambda m, t=f.t: None if m is None else round(m - t, 2)  # noqa: E731
        results.append(
            FaultResult(
                kind=f.kind,
                scheduled_s=f.scheduled,
                t_s=round(h._rel(f.t), 2),
                detail=f.detail,
                window=window,
                repaired_s=since(rec["repaired"]),
                drafter_back_s=since(rec["drafter_back"]),
                tokens_again_s=since(rec["tokens_again"]),
                edge_open=f.edge_open,
                edge_resumed=len(resumed),
                bad_actor=f.bad_actor,
                recovered=rec["recovered"] and bad_ok and drafter_ok,
            )
        )
    statuses = Counter(r.code for r in records if r.outcome == "status")
    lost = [r for r in records if r.outcome == "lost"]
    wrong = [r for r in records if r.wrong_at is not None]
    totals = {
        "requests": len(records),
        "completed": sum(r.outcome == "completed" for r in records),
        "statuses": dict(statuses),
        "lost": len(lost),
        "wrong": len(wrong),
        "edge_requests": sum(r.kind == "edge" for r in records),
        "edge_reconnects": sum(r.reconnects for r in records),
        "tokens": sum(r.tokens for r in records),
        "faults_injected": len(injected),
        "faults_scheduled": len(h.faults),
        "schedule_slip_s": round(h.slip_s, 1),
        "kinds_injected": sorted({f.kind for f in injected}),
    }
    problems = []
    if lost:
        problems.append(f"{len(lost)} request(s) LOST")
    if wrong:
        problems.append(f"{len(wrong)} answer(s) WRONG")
    for f in results:
        if f.t_s is None:
            problems.append(f"{f.kind} at {f.scheduled_s:g} s: {f.detail}")
        elif not f.recovered:
            why = "no tokens after it" if f.tokens_again_s is None else "no recovery seen"
            if f.kind.startswith("kill-") and f.repaired_s is None:
                why = "the scheduler did not repair it"
            elif f.kind == "kill-drafter" and f.drafter_back_s is None:
                why = "the rebuilt drafter was not back by the end of the run"
            if f.bad_actor is not None and not f.bad_actor.ok:
                why = (
                    f"got {', '.join(f.bad_actor.got)}, expected {', '.join(f.bad_actor.expected)}"
                )
            problems.append(f"{f.kind} at {f.t_s:g} s: {why}")
    bins = max(1, int(end) + 1)
    all_tokens, edge_tokens = [0] * bins, [0] * bins
    for r in records:
        for t, n in r.chunks:
            b = min(bins - 1, max(0, int(t)))
            all_tokens[b] += n
            if r.kind == "edge":
                edge_tokens[b] += n
    timeline = {
        "t_s": list(range(bins)),
        "tokens_per_s": all_tokens,
        "edge_tokens_per_s": edge_tokens,
    }
    return ChaosReport(
        config=config,
        server=server,
        reference=reference,
        baseline=baseline,
        faults=results,
        totals=totals,
        lost=[_brief(r) | {"why": r.details} for r in lost],
        wrong=[_brief(r) | {"first_difference": r.wrong_at, "tokens": r.tokens} for r in wrong],
        timeline=timeline,
        requests=records,
        wall_s=round(end, 1),
        machine=machine,
        ok=not problems,
        problems=problems,
    )


def _brief(r: RequestRecord) -> dict:
    return {"client": r.client, "kind": r.kind, "prompt": r.prompt, "ended_s": round(r.ended_s, 2)}


def format_table(report: ChaosReport) -> str:
    """The per-fault table (the fault-free baseline first), the totals and the verdict."""

    def f(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def codes(statuses: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())) or "-"

    base = report.baseline
    lines = [
        f"{'fault':<18} {'at s':>6} {'window s':>9} {'done':>5} {'lost':>4} {'wrong':>5} "
        f"{'tokens again s':>14} {'repaired s':>10} {'tok/s':>6} {'ttft p99 s':>10} "
        f"{'itl p99 ms':>10} {'recovered':>9}  statuses / bad actor"
    ]
    lines.append(
        f"{'baseline':<18} {'-':>6} {base.end_s - base.start_s:>9.1f} {base.completed:>5} "
        f"{base.lost:>4} {base.wrong:>5} {'-':>14} {'-':>10} {base.tokens_per_s:>6.1f} "
        f"{f(base.ttft_p99_s, '.2f'):>10} {f(base.itl_p99_ms, '.0f'):>10} {'-':>9}  "
        f"{codes(base.statuses)}"
    )
    for r in report.faults:
        if r.t_s is None or r.window is None:
            lines.append(f"{r.kind:<18} {r.scheduled_s:>6.1f}  {r.detail}")
            continue
        w = r.window
        repaired = r.repaired_s
        if r.drafter_back_s is not None:
            repaired_text = f"{f(repaired, '.1f')}/{r.drafter_back_s:.1f}"
        else:
            repaired_text = f(repaired, ".1f")
        extra = codes(w.statuses)
        if r.bad_actor is not None:
            b = r.bad_actor
            verdict = "as expected" if b.ok else f"EXPECTED {','.join(b.expected)}"
            extra += f" | bad actor: {','.join(b.got)} ({verdict})"
        if r.kind == "drop-edge":
            extra += f" | edge streams open {r.edge_open}, resumed {r.edge_resumed}"
        lines.append(
            f"{r.kind:<18} {r.t_s:>6.1f} {w.end_s - w.start_s:>9.1f} {w.completed:>5} "
            f"{w.lost:>4} {w.wrong:>5} {f(r.tokens_again_s, '.2f'):>14} {repaired_text:>10} "
            f"{w.tokens_per_s:>6.1f} {f(w.ttft_p99_s, '.2f'):>10} {f(w.itl_p99_ms, '.0f'):>10} "
            f"{'yes' if r.recovered else 'NO':>9}  {extra}"
        )
    t = report.totals
    lines += [
        "",
        f"whole run ({report.wall_s:.0f} s with the drain): {t['requests']} requests "
        f"({t['edge_requests']} edge), {t['completed']} completed, statuses: "
        f"{codes(t['statuses'])}; LOST {t['lost']}, WRONG {t['wrong']}; edge reconnects "
        f"{t['edge_reconnects']}; faults {t['faults_injected']}/{t['faults_scheduled']} of "
        f"{len(t['kinds_injected'])} kinds"
        + (
            f"; the schedule slipped {t['schedule_slip_s']:g} s (faults waited for recoveries)"
            if t.get("schedule_slip_s")
            else ""
        ),
        f"baseline: p99 TTFT {f(base.ttft_p99_s, '.2f')} s, p99 ITL {f(base.itl_p99_ms, '.0f')} ms "
        f"({base.start_s:.0f}-{base.end_s:.0f} s); repaired s: kills to the scheduler's repair "
        f"(kill-drafter: /drafter back)",
    ]
    for item in report.lost:
        lines.append(
            f"LOST: client {item['client']} ({item['kind']}) at {item['ended_s']} s: {item['why']}"
        )
    for item in report.wrong:
        lines.append(
            f"WRONG: client {item['client']} ({item['kind']}) prompt {item['prompt']} at "
            f"{item['ended_s']} s: differs from token {item['first_difference']}"
        )
    lines.append("verdict: " + ("ok" if report.ok else "FAILED: " + "; ".join(report.problems)))
    return "\n".join(lines)


def plot_chaos(report: ChaosReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(13, 7), sharex=True, height_ratios=[3, 2])
    tl = report.timeline
    ax1.plot(tl["t_s"], tl["tokens_per_s"], color="#3b75af", lw=1.2, label="all clients")
    ax1.plot(tl["t_s"], tl["edge_tokens_per_s"], color="#4f9a4f", lw=1, label="edge clients")
    top = max(tl["tokens_per_s"] + [1]) * 1.25
    for r in report.faults:
        if r.t_s is None:
            continue
        color = "#c0504d" if r.recovered else "black"
        for ax in (ax1, ax2):
            ax.axvline(r.t_s, color=color, lw=1, ls="--")
            if r.window is not None:
                ax.axvspan(r.window.start_s, r.window.end_s, color=color, alpha=0.07)
        ax1.annotate(r.kind, (r.t_s, top * 0.97), rotation=90, va="top", ha="right", fontsize=7,
                     color=color)  # fmt: skip
    ax1.axvspan(report.baseline.start_s, report.baseline.end_s, color="#4f9a4f", alpha=0.06)
    ax1.set_ylim(0, top)
    ax1.set_ylabel("tokens/s (1 s bins)")
    ax1.legend(fontsize=7, loc="upper right")
    styles = {
        "completed": ("o", "#3b75af"),
        "status": ("x", "#e69f00"),
        "lost": ("*", "#c0504d"),
    }
    for outcome, (marker, color) in styles.items():
        rs = [r for r in report.requests if r.outcome == outcome]
        xs = [r.ended_s for r in rs]
        ys = [r.ended_s - r.sent_s for r in rs]
        if xs:
            ax2.scatter(xs, ys, marker=marker, s=12, color=color, label=f"{outcome} ({len(xs)})")
    wrong = [r for r in report.requests if r.wrong_at is not None]
    if wrong:
        xs, ys = [r.ended_s for r in wrong], [r.ended_s - r.sent_s for r in wrong]
        ax2.scatter(xs, ys, marker="D", s=30, facecolors="none", edgecolors="red", label="wrong")
    ax2.set_ylabel("request time (s), at its end")
    ax2.set_xlabel(
        "time since the load started (s); dashed: faults (red: recovered), shaded: windows"
    )
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=7, loc="upper left")
    cfg = report.config
    t = report.totals
    fig.suptitle(
        f"distspec bench-chaos: {Path(cfg.target).name} + {Path(cfg.drafter).name} "
        f"({cfg.mode}, target TP {cfg.target_tp}), "
        f"{cfg.clients} clients ({cfg.edge_clients} edge), {cfg.duration_s:g} s, "
        f"{t['faults_injected']} faults; LOST {t['lost']}, WRONG {t['wrong']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
