"""What a gRPC client can make the server wait for, or choke on, on every RPC of the server
(distspec's, health checking, reflection).

grpc's sync server gives each call a thread of a fixed pool, and that thread blocks while the
call waits for a request message or for flow control to take a response. So without bounds a
few clients that open calls and send nothing, or stop reading, hold every thread (health
checks included). CallGuard bounds both with stall_timeout_s and ends such calls with
DEADLINE_EXCEEDED. It also parses requests itself: a message grpc cannot parse (bad wire
format, invalid UTF-8 in a string field) gets INVALID_ARGUMENT rather than grpc's INTERNAL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from distspec.server.gateway import InvalidRequest
from distspec.server.watchdog import Watchdog

log = logging.getLogger(__name__)


class Undecodable:
    """Stands for a request message that did not parse (grpc takes None for a failure)."""

    def __init__(self, error: Exception):
        self.error = error

    def message(self) -> str:
        return f"the request message does not parse: {self.error}"


def lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # protobuf's DecodeError, or anything a parser raises
            return Undecodable(e)

    return parse


def end_call(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End a call from another thread with a status. grpc's public cancel() can only say
    CANCELLED; the call's own cancel takes a status (grpc's private API, hence the fallback)."""
    try:
        context._rpc_event.call.cancel(code.value[0], details)  # type: ignore[attr-defined]
    except Exception:
        context.cancel()


class _CallTimer:
    """The one alarm of a call: armed while the call waits on its client."""

    def __init__(self, watchdog: Watchdog, context: grpc.ServicerContext, limit_s: float):
        self.limit_s, self.context = limit_s, context
        self.waiting_for = ""
        self.alarm = watchdog.alarm(self._expire) if limit_s > 0 else None
        if self.alarm is not None and not context.add_callback(self.alarm.close):
            self.alarm.close()  # the call is over already
            self.alarm = None

    def wait(self, what: str) -> None:
        if self.alarm is not None:
            self.waiting_for = what
            self.alarm.arm(self.limit_s)

    def done(self) -> None:
        if self.alarm is not None:
            self.alarm.disarm()

    def _expire(self) -> None:
        details = f"{self.waiting_for} for {self.limit_s:g} s"
        log.info("ending a gRPC call: %s", details)
        end_call(self.context, grpc.StatusCode.DEADLINE_EXCEEDED, details)


class _Requests:
    """A call's request iterator, each wait bounded (or only the first: open-ended streams,
    whose later messages come when the client has something to say)."""

    def __init__(self, requests: Iterator[Any], timer: _CallTimer, first_only: bool):
        self.requests, self.timer, self.first_only = requests, timer, first_only
        self.count = 0

    def __iter__(self) -> _Requests:
        return self

    def __next__(self) -> Any:
        bounded = self.count == 0 or not self.first_only
        if bounded:
            self.timer.wait("no request message" if self.count == 0 else "no next message")
        try:
            request = next(self.requests)
        finally:
            if bounded:
                self.timer.done()
        self.count += 1
        if isinstance(request, Undecodable):
            raise InvalidRequest(request.message())
        return request


def _responses(responses: Iterator[Any], timer: _CallTimer, context) -> Iterator[Any]:
    """The handler's responses; waiting for the client to take one is bounded, and a bad
    message found by the handler's reads ends the call with INVALID_ARGUMENT."""
    try:
        for response in responses:
            timer.wait("the client took no response")
            try:
                yield response
            finally:
                timer.done()
    except InvalidRequest as e:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


class CallGuard(grpc.ServerInterceptor):
    def __init__(
        self, watchdog: Watchdog, stall_timeout_s: float, open_ended: frozenset[str] = frozenset()
    ):
        """stall_timeout_s: the longest a call waits for a request message or for its client
        to take a response (0: no bound); open_ended: methods ("/pkg.Service/Method") whose
        messages after the first may take as long as the client likes."""
        self.watchdog, self.stall_timeout_s, self.open_ended = watchdog, stall_timeout_s, open_ended

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        inner = (
            handler.unary_unary or handler.unary_stream or handler.stream_unary
        ) or handler.stream_stream
        first_only = details.method in self.open_ended
        streaming_in, streaming_out = handler.request_streaming, handler.response_streaming

        def argument(requests, context, timer: _CallTimer):
            guarded = _Requests(requests, timer, first_only)
            if streaming_in:
                return guarded
            try:
                return next(guarded)
            except InvalidRequest as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except StopIteration:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call has no request")

        # every call becomes request-streaming: grpc would wait for a unary request on the
        # call's thread before the handler runs, unbounded
        def behavior(requests, context, send_response_callback=None):
            timer = _CallTimer(self.watchdog, context, self.stall_timeout_s)
            request = argument(requests, context, timer)
            try:
                if send_response_callback is not None:  # a non-blocking handler
                    send = _bounded_send(send_response_callback, timer)
                    return inner(request, context, send)
                result = inner(request, context)
            except InvalidRequest as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return _responses(result, timer, context) if streaming_out else result

        # (health checking's Watch answers from other threads, holding none while it waits)
        if streaming_out and getattr(inner, "experimental_non_blocking", False):
            behavior.experimental_non_blocking = True  # type: ignore[attr-defined]
            pool = getattr(inner, "experimental_thread_pool", None)
            behavior.experimental_thread_pool = pool  # type: ignore[attr-defined]
        make = (
            grpc.stream_stream_rpc_method_handler
            if streaming_out
            else grpc.stream_unary_rpc_method_handler
        )
        return make(
            behavior,
            request_deserializer=lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


def _bounded_send(send: Callable[[Any], None], timer: _CallTimer) -> Callable[[Any], None]:
    def bounded(response: Any) -> None:
        timer.wait("the client took no response")
        try:
            send(response)
        finally:
            timer.done()

    return bounded
