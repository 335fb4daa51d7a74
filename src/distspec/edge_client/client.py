"""The on-device side: a local drafter streaming drafts to the server's target over gRPC.

Stop-and-wait (overlap=False): draft k tokens, send them, wait for their verdict, repeat.
The server waits for each chunk, so every round pays draft + RTT + verify.

Overlap (the default; ../shared/design/algorithms.md section 3): the session never waits on
the network. The server keeps decoding on its own while no chunk is there (keep_decoding);
the client drafts from the latest verified tokens it knows, including a lead of the tokens
the server will have decoded by the time the chunk arrives, so the chunk's first tokens
predict those. The server matches them against what it decoded meanwhile and verifies the
rest as a draft (a mismatch drops the chunk). Round trips then cost no target time: the
session runs at least at the server's own decoding speed, and a right chunk adds its tokens.

Drafts travel as token ids only, greedy or sampled: the client gives every request a seed
(its own, else a fresh one) and the drafter draws with that seed's noise, the noise the
server's verifier draws the target's tokens with (spec_decode/sampling.py), so the server only
compares tokens and the output is the target's own draws whatever arrived in time.
"""

from __future__ import annotations

import queue
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from distspec.models.identity import ModelIdentity
from distspec.models.openmp import call_then_release
from distspec.spec_decode.decoding import GenerationStats
from distspec.spec_decode.drafter import Draft, Drafter
from distspec.spec_decode.sampling import SamplingParams
from distspec.v1 import speculative_decoding_pb2 as pb
from distspec.v1 import speculative_decoding_pb2_grpc as pb_grpc

FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_CANCELLED: "cancelled",
}


@dataclass
class EdgeStats(GenerationStats):
    """GenerationStats (target_forwards: the server's steps for this session) plus the link."""

    rounds: int = 0  # chunks verified
    rtt_ms: float = 0.0  # median time from sending a chunk to its verdict
    hidden_rtt_fraction: float = 0.0  # target steps taken while a chunk was on the way
    reconnects: int = 0  # broken streams resumed
    prepared_chunks: int = 0  # chunks drafted during the previous one's flight and sent at once


@dataclass
class EdgeStep:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    stats: EdgeStats | None = None  # on the last step


@dataclass
class _Run:
    """One generation's client-side state, kept across reconnections."""

    params: SamplingParams
    session_id: str | None = None
    secret: str = ""
    verified: list[int] = field(default_factory=list)
    stats: EdgeStats = field(default_factory=EdgeStats)
    t0: float = field(default_factory=time.perf_counter)
    last_verdict: float | None = None
    rtts: list[float] = field(default_factory=list)
    step_gaps: list[float] = field(default_factory=list)  # between verdicts: the server's pace
    decoded_in_flight: int = 0  # verdicts that came while a chunk was travelling
    resumes: int = 0
    reused: int = 0  # chunks that went out already drafted
    prepared: tuple | None = None  # (verified, chunk sent, future draft after it)

    def finish(self, server_stats) -> EdgeStats:
        s = self.stats
        s.wall_s = time.perf_counter() - self.t0
        s.target_forwards = server_stats.target_forwards
        s.rtt_ms = 1000 * statistics.median(self.rtts) if self.rtts else 0.0
        total = s.rounds + self.decoded_in_flight
        s.hidden_rtt_fraction = self.decoded_in_flight / total if total else 0.0
        s.reconnects = self.resumes
        s.prepared_chunks = self.reused
        return s


class EdgeClient:
    def __init__(
        self,
        server: str,
        drafter: Drafter,
        gamma: int = 4,
        overlap: bool = True,
        timeout_s: float = 300.0,
        tls_ca: str | None = None,
        token: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        max_retries: int = 5,
        backoff_s: float = 0.1,
        backoff_max_s: float = 2.0,
        drafter_model: ModelIdentity | None = None,
    ):
        """server: "host:port"; drafter: any Drafter sharing the target's tokenizer.
        tls_ca: connect with TLS, trusting this CA (PEM); tls_cert/tls_key: this client's
        certificate for mutual TLS; token: bearer token sent with every call;
        max_retries, backoff_s, backoff_max_s: reconnection after a broken stream;
        drafter_model: the drafter's model (models/identity.py), for the server to check
        against its target's before it verifies a draft."""
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        self.server, self.drafter, self.gamma = server, drafter, gamma
        self.overlap, self.timeout_s = overlap, timeout_s
        self.max_retries, self.backoff_s, self.backoff_max_s = max_retries, backoff_s, backoff_max_s
        self._metadata = [("authorization", f"Bearer {token}")] if token else []
        if tls_ca or tls_cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca),
                private_key=_read(tls_key),
                certificate_chain=_read(tls_cert),
            )
            self._channel = grpc.secure_channel(server, credentials)
        else:
            self._channel = grpc.insecure_channel(server)
        self._stub = pb_grpc.SpeculativeDecodingStub(self._channel)
        self._drafting = ThreadPoolExecutor(1, thread_name_prefix="edge-drafter")
        self._drafter_model = None
        if drafter_model is not None:
            m = drafter_model
            self._drafter_model = pb.ModelIdentity(
                vocab_size=m.vocab_size, vocab_sha256=m.vocab_sha256, weights=m.weights
            )

    def close(self) -> None:
        self._channel.close()
        self._drafting.shutdown(wait=True)

    def generate(
        self,
        params: SamplingParams,
        prompt: str | None = None,
        messages: list[tuple[str, str]] | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> Iterator[EdgeStep]:
        """Stream the verified tokens: prompt (raw text), messages ((role, content); the
        server applies the chat template) or prompt_token_ids. A broken connection is
        re-established with backoff and the session resumed from the last verified token (or,
        cut before the session opened, opened afresh: no token was verified yet)."""
        params = params.seeded()  # the server's draws and the drafter's share the seed
        open_ = pb.OpenSession(
            keep_decoding=self.overlap,
            prompt=prompt or "",
            messages=[pb.ChatMessage(role=r, content=c) for r, c in messages or []],
            prompt_token_ids=prompt_token_ids or [],
            sampling=_sampling_options(params),
            drafter_model=self._drafter_model,
        )
        run = _Run(params)
        failures = 0
        try:
            while True:
                requests: queue.Queue = queue.Queue()
                requests.put(pb.SpeculateRequest(open=open_))
                responses = self._stub.Speculate(
                    iter(requests.get, None), timeout=self.timeout_s, metadata=self._metadata
                )
                try:
                    for step in self._run(responses, requests, run):
                        failures = 0
                        yield step
                    return
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.UNAVAILABLE or failures >= self.max_retries:
                        raise
                    failures += 1
                    run.resumes += 1
                    time.sleep(min(self.backoff_max_s, self.backoff_s * 2 ** (failures - 1)))
                    if run.session_id is not None:  # else it never opened: open it again
                        open_ = pb.OpenSession(
                            resume_session_id=run.session_id,
                            resume_secret=run.secret,
                            resume_position=len(run.verified),
                        )
                finally:
                    requests.put(None)
                    responses.cancel()
        finally:
            if run.prepared is not None:
                run.prepared[2].result()  # the drafter is free again before the next request
            if run.session_id is not None:
                self.drafter.finish()

    def _run(self, responses, requests: queue.Queue, run: _Run) -> Iterator[EdgeStep]:
        opened = next(responses).opened
        stats, params = run.stats, run.params
        if run.session_id is None:
            run.session_id, run.secret = opened.session_id, opened.resume_secret
            run.verified = list(opened.prompt_token_ids)
            stats.prompt_tokens = len(run.verified)
            self.drafter.start(run.verified, params)
        max_chunk = opened.max_draft_tokens
        in_flight: tuple[float, int] | None = None  # (sent at, tokens sent)
        for response in responses:
            verdict = response.verdict
            now = time.perf_counter()
            if verdict.position != len(run.verified):
                raise RuntimeError(
                    f"verdict at position {verdict.position}, expected {len(run.verified)}"
                )
            new = list(verdict.token_ids)
            run.verified += new
            stats.new_tokens += len(new)
            if run.last_verdict is None:
                stats.time_to_first_token_s = now - run.t0
            else:
                run.step_gaps.append(now - run.last_verdict)
            run.last_verdict = now
            if in_flight is not None:
                if verdict.chunk_done:
                    run.rtts.append(now - in_flight[0])
                    stats.rounds += 1
                    stats.draft_tokens += in_flight[1]
                    stats.accepted_tokens += verdict.num_accepted
                    in_flight = None
                else:
                    run.decoded_in_flight += 1
            finish = FINISH.get(verdict.finish_reason)
            if finish:
                yield EdgeStep(new, verdict.text, finish, run.finish(verdict.stats))
                return
            yield EdgeStep(new, verdict.text)
            if in_flight is not None:
                continue
            remaining = params.max_new_tokens - stats.new_tokens
            lead = self._lead(run.rtts, run.step_gaps, max_chunk) if self.overlap else 0
            k = max(0, min(lead + self.gamma, max_chunk, remaining - 1))
            chunk = self._ready_chunk(run, k)
            if chunk is None:
                chunk = self.drafter.propose(run.verified, k) if k else Draft([])
            requests.put(pb.SpeculateRequest(draft=_chunk_message(len(run.verified), chunk)))
            in_flight = (time.perf_counter(), len(chunk))
            if self.overlap and k:
                # draft on while the chunk travels, as if it were all verified
                context = run.verified + chunk.tokens
                future = self._drafting.submit(
                    call_then_release, self.drafter.propose, context, self.gamma
                )
                run.prepared = (list(run.verified), chunk, future)

    def _ready_chunk(self, run: _Run, k: int) -> Draft | None:
        """The chunk drafted during the last flight, if the verified tokens so far are the
        ones it assumed: its part after them goes out at once. (Each token of it was drawn
        given the tokens before it, so that part is still a draft of the verified text.)"""
        if run.prepared is None:
            return None
        base, sent, future = run.prepared
        run.prepared = None
        predicted = sent + future.result()
        full = base + predicted.tokens
        if k == 0 or len(run.verified) >= len(full) or run.verified != full[: len(run.verified)]:
            return None
        run.reused += 1
        return predicted[len(run.verified) - len(base) :][:k]

    def _lead(self, rtts: list[float], step_gaps: list[float], max_chunk: int) -> int:
        """Tokens the server decodes while a chunk travels: the first ones of a chunk stand
        for them (at least one draft token must remain after them)."""
        if not rtts or not step_gaps:
            return 1
        rtt = statistics.median(rtts[-8:])
        gap = statistics.median(step_gaps[-16:])
        return max(1, min(max_chunk - 1, round(rtt / gap) - 1)) if gap > 0 else 1


def _read(path: str | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def _sampling_options(params: SamplingParams) -> pb.SamplingOptions:
    options = pb.SamplingOptions(
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        stop_token_ids=params.stop_token_ids,
    )
    if params.seed is not None:
        options.seed = params.seed
    return options


def _chunk_message(position: int, draft: Draft) -> pb.DraftChunk:
    return pb.DraftChunk(position=position, token_ids=draft.tokens)
