"""The gRPC front end: distspec.v1.SpeculativeDecoding, health checking and reflection.

Every field is validated here; a bad request gets INVALID_ARGUMENT with a message naming the
field, a full server RESOURCE_EXHAUSTED with a retry hint (trailing metadata
`retry-after-s`), a failure on the server UNAVAILABLE. A client that disconnects or lets its
deadline pass cancels its session, which frees its KV slot.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from distspec.models.tokenizer import ChatMessage, StreamDecoder
from distspec.scheduler.runtime import Runtime
from distspec.scheduler.scheduler import AdmissionError, ShuttingDownError
from distspec.scheduler.session import Session, SessionError
from distspec.spec.decoding import GenerationStats
from distspec.spec.sampling import SamplingParams
from distspec.v1 import speculative_decoding_pb2 as pb
from distspec.v1 import speculative_decoding_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["SpeculativeDecoding"].full_name
DEFAULT_MAX_NEW_TOKENS = 128
ROLES = ("system", "user", "assistant")
FINISH = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}
STEP_TIMEOUT_S = 300.0  # a session that makes no progress this long has lost its workers


class InvalidRequest(ValueError):
    pass


class SpeculativeDecodingServicer(pb_grpc.SpeculativeDecodingServicer):
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.scheduler = runtime.scheduler
        self.tokenizer = runtime.tokenizer

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        try:
            prompt_ids = self._prompt_ids(request.prompt, request.messages)
            params = self._sampling(request)
        except (InvalidRequest, ValueError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        session = self._submit(prompt_ids, params, context)
        yield from self._stream(session, context)

    def Speculate(self, request_iterator, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Speculate is not served by this server yet")

    # -- helpers ---------------------------------------------------------------------------

    def _submit(self, prompt_ids, params, context) -> Session:
        try:
            session = self.scheduler.submit(prompt_ids, params)
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
        context.add_callback(lambda: self.scheduler.cancel(session.id))
        return session

    def _stream(self, session: Session, context) -> Iterator[pb.GenerateResponse]:
        decoder = StreamDecoder(self.tokenizer)
        try:
            for step in session.stream(timeout_s=STEP_TIMEOUT_S):
                response = pb.GenerateResponse(
                    token_ids=step.token_ids,
                    text=decoder.push(step.token_ids, final=step.finish_reason is not None),
                    finish_reason=FINISH[step.finish_reason],
                )
                if step.stats is not None:
                    response.stats.CopyFrom(stats_message(step.stats))
                yield response
        except (SessionError, ShuttingDownError) as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except TimeoutError:
            self.scheduler.cancel(session.id)
            context.abort(grpc.StatusCode.UNAVAILABLE, "generation stalled on the server")

    def _prompt_ids(self, prompt: str, messages) -> list[int]:
        if bool(prompt) == bool(messages):
            raise InvalidRequest("give exactly one of prompt and messages")
        if prompt:
            return self.tokenizer.encode(prompt)
        chat = []
        for i, m in enumerate(messages):
            if m.role not in ROLES:
                raise InvalidRequest(
                    f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r}"
                )
            if not m.content:
                raise InvalidRequest(f"messages[{i}].content is empty")
            chat.append(ChatMessage(m.role, m.content))
        return self.tokenizer.encode_chat(chat)

    def _sampling(self, r) -> SamplingParams:
        max_new = r.max_new_tokens if r.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
        if max_new < 1:
            raise InvalidRequest("max_new_tokens must be >= 1")
        temperature = r.temperature if r.HasField("temperature") else 0.0
        if not math.isfinite(temperature) or temperature < 0:
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {temperature}")
        top_p = r.top_p if r.HasField("top_p") else 1.0
        if not (0 < top_p <= 1):
            raise InvalidRequest(f"top_p must be in (0, 1], got {top_p}")
        vocab = self.runtime.info.vocab_size
        bad = [t for t in r.stop_token_ids if t >= vocab]
        if bad:
            raise InvalidRequest(f"stop_token_ids: {bad[0]} is outside the vocabulary")
        return SamplingParams(
            max_new_tokens=max_new,
            temperature=temperature,
            top_p=top_p,
            top_k=r.top_k if r.HasField("top_k") else 0,
            seed=r.seed if r.HasField("seed") else None,
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
    )


class GrpcServer:
    """The servicer on a port, with health checking and reflection."""

    def __init__(self, runtime: Runtime, port: int = 0, host: str = "[::]"):
        slots = runtime.info.num_slots + runtime.config.scheduler.max_waiting
        # one thread per open stream, and a few to answer admission refusals and health
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=slots + 8))
        pb_grpc.add_SpeculativeDecodingServicer_to_server(
            SpeculativeDecodingServicer(runtime), self.server
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")

    def start(self) -> int:
        self.server.start()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    def stop(self, grace_s: float = 5.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()
