"""The gRPC front end: distspec.v1.SpeculativeDecoding, health checking and reflection.

Every field is validated here; a bad request gets INVALID_ARGUMENT with a message naming the
field, a full server RESOURCE_EXHAUSTED with a retry hint (trailing metadata
`retry-after-s`), a failure on the server UNAVAILABLE, a request past the server's time
limits DEADLINE_EXCEEDED. A client that disconnects or lets its deadline pass cancels its
session, which frees its KV slot.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from distspec.models.identity import ModelIdentity, mismatch, model_identity
from distspec.models.tokenizer import StreamDecoder
from distspec.scheduler.runtime import Runtime
from distspec.scheduler.scheduler import AdmissionError, ShuttingDownError
from distspec.scheduler.session import Session, SessionError
from distspec.server.gateway import (
    ClientLimitError,
    Gateway,
    InvalidRequest,
    RequestTimeoutError,
    StalledError,
)
from distspec.server.grpc_guard import CallGuard
from distspec.server.security import (
    BearerTokenInterceptor,
    ClientLedger,
    ClientLimits,
    TlsConfig,
    client_id,
)
from distspec.server.watchdog import Alarm
from distspec.spec_decode.decoding import GenerationStats, StepOutput
from distspec.spec_decode.drafter import Draft
from distspec.spec_decode.sampling import SamplingParams
from distspec.v1 import speculative_decoding_pb2 as pb
from distspec.v1 import speculative_decoding_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["SpeculativeDecoding"].full_name
# a stream that ends this close to its deadline ended because of it
DEADLINE_SLACK_S = 0.1
FINISH = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}


@dataclass
class _Resumable:
    """A Speculate session that a new stream of the same client may take over."""

    session: Session
    secret: str
    client: str
    expiry: Alarm | None = None  # while detached: when the session is given up


class SpeculativeDecodingServicer(pb_grpc.SpeculativeDecodingServicer):
    def __init__(
        self,
        runtime: Runtime,
        limits: ClientLimits | None = None,
        resume_timeout_s: float = 30,
        gateway: Gateway | None = None,
    ):
        """gateway: shared with the other front doors (then limits are its own)."""
        self.runtime = runtime
        self.resume_timeout_s = resume_timeout_s
        self._resumable: dict[str, _Resumable] = {}
        self._lock = threading.Lock()
        self.scheduler = runtime.scheduler
        self.tokenizer = runtime.tokenizer
        self.gateway = gateway or Gateway(runtime, limits)
        self.ledger: ClientLedger = self.gateway.ledger
        self._identity: ModelIdentity | None = None  # the target's, at the first check

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        try:
            prompt_ids = self.gateway.prompt_ids(request.prompt, request.messages)
            params = self._sampling(request)
        except (InvalidRequest, ValueError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        session = self._submit(prompt_ids, params, context)
        yield from self._stream(session, context)

    def Speculate(self, request_iterator, context: grpc.ServicerContext):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "open":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be open")
        if first.open.resume_session_id:
            session, resumable = self._resume(first.open, context)
            position = first.open.resume_position
        else:
            try:
                self._check_drafter_model(first.open)
                prompt_ids = self._open_prompt_ids(first.open)
                params = self._sampling(first.open.sampling)
            except (InvalidRequest, ValueError) as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            session = self._submit(
                prompt_ids,
                params,
                context,
                external=True,
                keep_decoding=first.open.keep_decoding,
                cancel_on_end=False,
            )
            resumable = _Resumable(session, secrets.token_hex(16), client_id(context))
            with self._lock:
                self._resumable[str(session.id)] = resumable
            position = len(prompt_ids)
        with self._lock:
            session.epoch += 1
            epoch = session.epoch
            if resumable.expiry is not None:
                resumable.expiry.close()
                resumable.expiry = None
        if epoch > 1:
            session.wake_readers()  # a stream this one replaces ends now
        context.add_callback(lambda: self._detach(resumable, epoch, context))
        yield pb.SpeculateResponse(
            opened=pb.SessionOpened(
                session_id=str(session.id),
                prompt_token_ids=session.prompt_ids,
                max_draft_tokens=self.scheduler.config.max_draft,
                resume_secret=resumable.secret,
            )
        )
        problem: list[tuple[grpc.StatusCode, str]] = []  # found by the reader thread
        reader = threading.Thread(
            target=self._read_chunks,
            args=(request_iterator, session, problem, epoch),
            name=f"speculate-{session.id}",
            daemon=True,
        )
        reader.start()
        decoder = StreamDecoder(self.tokenizer, session.tokens[len(session.prompt_ids) : position])
        catch_up = session.tokens[position:]  # what a resumed client missed
        if first.open.resume_session_id and session.finished:  # resumed after the end
            self._abort_if_timed_out(session, context)
            last = StepOutput([], session.finish_reason, session.stats, position=position)
            yield self._verdict(decoder, position, catch_up, last, chunk_done=True)
            return
        if first.open.resume_session_id:
            # always answered, even with no tokens: a stop-and-wait client drafts on this
            yield self._verdict(decoder, position, catch_up, None, chunk_done=True)
            position += len(catch_up)
        ended = False
        try:
            for step in session.stream(timeout_s=None, epoch=epoch):
                if problem:
                    break
                if step.finish_reason == "cancelled":
                    self._abort_if_timed_out(session, context)
                # steps already covered by the catch-up (or taken by a stream that broke)
                tokens = step.token_ids[max(0, position - step.position) :]
                if step.position + len(step.token_ids) < position:
                    tokens = []
                if not tokens and step.finish_reason is None and not step.chunk_done:
                    continue
                ended = step.finish_reason is not None
                yield self._verdict(decoder, position, tokens, step)
                position += len(tokens)
        except (SessionError, ShuttingDownError) as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        if problem:
            context.abort(*problem[0])
        if not ended:  # the stream loop gave way to a newer stream (the session resumed)
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "another stream resumed this session"
            )

    def _abort_if_timed_out(self, session: Session, context) -> None:
        """A session the server ended for a time limit: DEADLINE_EXCEEDED, saying which."""
        if session.timed_out:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, self.gateway.timeout_message())
        if session.idle:
            timeout = self.scheduler.config.idle_timeout_s
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no draft chunk for {timeout:g} s")

    def _verdict(self, decoder, position, tokens, step, chunk_done=False) -> pb.SpeculateResponse:
        final = step is not None and step.finish_reason is not None
        verdict = pb.Verdict(
            position=position,
            num_accepted=step.num_accepted if step else 0,
            token_ids=tokens,
            text=decoder.push(tokens, final=final),
            finish_reason=FINISH[step.finish_reason if step else None],
            chunk_done=chunk_done or (step is not None and step.chunk_done),
        )
        if step is not None and step.stats is not None:
            verdict.stats.CopyFrom(stats_message(step.stats))
        return pb.SpeculateResponse(verdict=verdict)

    def _resume(self, open_: pb.OpenSession, context) -> tuple[Session, _Resumable]:
        with self._lock:
            r = self._resumable.get(open_.resume_session_id)
        # the same answer for an unknown id, a wrong secret and another client's session
        # (as bytes: compare_digest refuses str with non-ASCII characters)
        ok = r is not None and hmac.compare_digest(r.secret.encode(), open_.resume_secret.encode())
        if not ok or r.client != client_id(context):
            context.abort(grpc.StatusCode.NOT_FOUND, "no session to resume with that id")
        session = r.session
        if not len(session.prompt_ids) <= open_.resume_position <= len(session.tokens):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"resume_position must be in [{len(session.prompt_ids)}, {len(session.tokens)}]",
            )
        client = r.client
        refused = self.ledger.admit(client)
        if refused:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
        context.add_callback(lambda: self.ledger.release(client))
        return session, r

    def _detach(self, r: _Resumable, epoch: int, context) -> None:
        """The stream ended: the session waits resume_timeout_s for its client to come back
        (finished ones too: the stream may have broken before the last verdict got
        through), then is forgotten and, if unfinished, cancelled. Past the client's
        deadline there is nothing to come back for: that happens at once."""
        with self._lock:
            if r.session.epoch != epoch:
                return  # a newer stream took over
            if context.time_remaining() > DEADLINE_SLACK_S:
                expire = lambda: self._expire(r, epoch)  # noqa: E731
                r.expiry = self.gateway.watchdog.after(self.resume_timeout_s, expire)
                return
        self._expire(r, epoch)

    def _expire(self, r: _Resumable, epoch: int) -> None:
        with self._lock:
            if r.session.epoch != epoch:
                return
            self._resumable.pop(str(r.session.id), None)
        if not r.session.finished:
            self.scheduler.cancel(r.session.id)

    def _read_chunks(self, requests, session: Session, problem: list, epoch: int) -> None:
        """Offer each draft chunk of the stream; a bad one ends the session (problem: the
        status to end the stream with)."""
        try:
            for request in requests:
                if session.epoch != epoch:
                    return  # a newer stream resumed the session: this one's chunks are stale
                if request.WhichOneof("kind") != "draft":
                    raise InvalidRequest("only draft chunks may follow open")
                position, draft = self._draft(request.draft)
                try:
                    self.scheduler.offer(session.id, position, draft)
                except ValueError:
                    if not session.finished:
                        raise
                    # a chunk that crossed the last verdict on the wire: nothing to do
        except (InvalidRequest, ValueError) as e:
            problem.append((grpc.StatusCode.INVALID_ARGUMENT, str(e)))
            self.scheduler.cancel(session.id)
        except grpc.RpcError:  # the client went away; the RPC callback detaches the session
            pass
        except Exception:  # a bug, not the client's fault: still end the stream, not hang it
            log.exception("Speculate: a draft chunk could not be handled")
            problem.append((grpc.StatusCode.INTERNAL, "the server failed to handle a chunk"))
            self.scheduler.cancel(session.id)

    # -- helpers ---------------------------------------------------------------------------

    def _submit(
        self,
        prompt_ids,
        params,
        context,
        external: bool = False,
        keep_decoding: bool = False,
        cancel_on_end: bool = True,
    ) -> Session:
        client = client_id(context)
        try:
            session = self.gateway.submit(client, prompt_ids, params, external, keep_decoding)
        except ClientLimitError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except AdmissionError as e:
            context.set_trailing_metadata((("retry-after-s", f"{e.retry_after_s:g}"),))
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{e}; retry in {e.retry_after_s:g} s",
            )
        except ShuttingDownError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        context.add_callback(lambda: self.gateway.release(client))
        if cancel_on_end:
            context.add_callback(lambda: self.scheduler.cancel(session.id))
        return session

    def _stream(self, session: Session, context) -> Iterator[pb.GenerateResponse]:
        try:
            for delta in self.gateway.deltas(session):
                response = pb.GenerateResponse(
                    token_ids=delta.token_ids,
                    text=delta.text,
                    finish_reason=FINISH[delta.finish_reason],
                )
                if delta.stats is not None:
                    response.stats.CopyFrom(stats_message(delta.stats))
                yield response
        except (SessionError, ShuttingDownError, StalledError) as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except RequestTimeoutError as e:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))

    def _check_drafter_model(self, open_: pb.OpenSession) -> None:
        if not open_.HasField("drafter_model"):
            return
        if self._identity is None:
            target = self.runtime.config.cluster.target.model
            self._identity = model_identity(target, self.tokenizer, self.runtime.info.vocab_size)
        m = open_.drafter_model
        problem = mismatch(self._identity, ModelIdentity(m.vocab_size, m.vocab_sha256, m.weights))
        if problem:
            raise InvalidRequest(problem)

    def _open_prompt_ids(self, open_: pb.OpenSession) -> list[int]:
        given = [bool(open_.prompt), bool(open_.messages), bool(open_.prompt_token_ids)]
        if sum(given) != 1:
            raise InvalidRequest("give exactly one of prompt, messages and prompt_token_ids")
        if open_.prompt_token_ids:
            return list(open_.prompt_token_ids)  # the scheduler checks them against the vocab
        return self.gateway.prompt_ids(open_.prompt, open_.messages)

    def _draft(self, chunk: pb.DraftChunk) -> tuple[int, Draft]:
        """(position, Draft) of a chunk."""
        tokens = list(chunk.token_ids)
        max_draft = self.scheduler.config.max_draft
        if len(tokens) > max_draft:
            raise InvalidRequest(f"the chunk has {len(tokens)} tokens; at most {max_draft}")
        vocab = self.runtime.info.vocab_size
        bad = [t for t in tokens if t >= vocab]
        if bad:
            raise InvalidRequest(f"draft token {bad[0]} is outside the vocabulary")
        return chunk.position, Draft(tokens)

    def _sampling(self, r) -> SamplingParams:
        def given(name: str):
            return getattr(r, name) if r.HasField(name) else None

        return self.gateway.sampling(
            max_new_tokens=given("max_new_tokens"),
            temperature=given("temperature"),
            top_p=given("top_p"),
            top_k=given("top_k"),
            seed=given("seed"),
            stop_token_ids=list(r.stop_token_ids),
        )


def stats_message(stats: GenerationStats) -> pb.GenerationStats:
    return pb.GenerationStats(
        prompt_tokens=stats.prompt_tokens,
        new_tokens=stats.new_tokens,
        target_forwards=stats.target_forwards,
        draft_tokens=stats.draft_tokens,
        accepted_tokens=stats.accepted_tokens,
        tokens_per_target_forward=stats.tokens_per_target_forward,
        acceptance_rate=stats.acceptance_rate,
        time_to_first_token_s=stats.time_to_first_token_s,
        wall_s=stats.wall_s,
        tokens_per_s=stats.tokens_per_s,
        accepted_per_position=stats.accepted_per_position,
        cached_tokens=stats.cached_tokens,
    )


class GrpcServer:
    """The servicer on a port, with health checking and reflection."""

    def __init__(
        self,
        runtime: Runtime,
        port: int = 0,
        host: str = "[::]",
        tls: TlsConfig | None = None,
        tokens: set[str] | None = None,
        limits: ClientLimits | None = None,
        resume_timeout_s: float = 30.0,
        gateway: Gateway | None = None,
    ):
        """tls: serve TLS (mutual with a client CA); tokens: bearer tokens the distspec
        service requires (health and reflection stay open); limits: per client;
        resume_timeout_s: how long a Speculate session whose stream broke waits for its
        client to resume it before it is cancelled; gateway: shared with the HTTP API (its
        per-client limits then apply, not `limits`). The gateway's stall_timeout_s bounds
        how long any call waits on its client (see grpc_guard)."""
        gateway = gateway or Gateway(runtime, limits)
        slots = runtime.info.num_slots + runtime.config.scheduler.max_waiting
        guard = CallGuard(
            gateway.watchdog, gateway.stall_timeout_s, frozenset({f"/{SERVICE}/Speculate"})
        )
        # the token check first: a refused call is answered before anything is read
        interceptors = [BearerTokenInterceptor(tokens)] if tokens else []
        # one thread per open stream, and a few to answer admission refusals and health
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=slots + 8), interceptors=[*interceptors, guard]
        )
        self.servicer = SpeculativeDecodingServicer(runtime, limits, resume_timeout_s, gateway)
        pb_grpc.add_SpeculativeDecodingServicer_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        address = f"{host}:{port}"
        if tls is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, tls.credentials())
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")

    def start(self) -> int:
        self.server.start()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    def drain(self) -> None:
        """Health checks answer NOT_SERVING from now on (the scheduler refuses new sessions)."""
        self.health.enter_graceful_shutdown()

    def stop(self, grace_s: float = 5.0) -> None:
        self.drain()
        self.server.stop(grace_s).wait()
