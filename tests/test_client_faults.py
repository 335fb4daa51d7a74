"""Clients that misbehave on the wire: they disconnect mid-answer, stop reading, or open calls
and send nothing. Every such session and its KV slot come back (scheduler state and the
distspec:active_sessions gauge), and well-behaved sessions alongside get exactly their output."""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from distspec.server.http_api import HttpApi
from distspec.v1 import speculative_decoding_pb2 as pb
from distspec.v1 import speculative_decoding_pb2_grpc as pb_grpc
from served import (
    SERVICE,
    Served,
    active_sessions,
    expected,
    generate_ids,
    http_request,
    serve_tiny,
    slow_down,
    wait_all_free,
    wait_for,
)

STALL_S = 1.5  # the server's stall timeout here
IDLE_S = 1.0  # the scheduler's idle timeout for Speculate sessions without chunks


@pytest.fixture(scope="module")
def served(tiny_dir):
    with serve_tiny(
        tiny_dir,
        slots=3,
        max_waiting=4,
        idle_timeout_s=IDLE_S,
        resume_timeout_s=0.3,
        stall_timeout_s=STALL_S,
    ) as s:
        yield s


@pytest.fixture
def slow_steps(served, monkeypatch):
    """A 250-token answer lasts over a second."""
    slow_down(served, monkeypatch, 0.005)


@pytest.fixture
def sessions(served, monkeypatch) -> list:
    """The sessions the gateway admits during the test."""
    admitted = []
    submit = served.gateway.submit

    def recording(*args, **kwargs):
        admitted.append(submit(*args, **kwargs))
        return admitted[-1]

    monkeypatch.setattr(served.gateway, "submit", recording)
    return admitted


class GoodClients:
    """Well-behaved requests on both doors, in threads, while a fault happens."""

    def __init__(self, served: Served, target, n: int = 40):
        self.served, self.n = served, n
        tokenizer = served.runtime.tokenizer
        self.want = {
            "grpc": expected(target, tokenizer.encode("Hello"), n),
            "http": tokenizer.decode(expected(target, tokenizer.encode("abc"), n)),
        }
        self.got: dict[str, object] = {}
        self.threads = [
            threading.Thread(target=self._grpc, daemon=True),
            threading.Thread(target=self._http, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _grpc(self) -> None:
        self.got["grpc"] = generate_ids(self.served, "Hello", self.n)

    def _http(self) -> None:
        body = {"prompt": "abc", "max_tokens": self.n}
        status, reply = http_request(self.served, "POST", "/v1/completions", body)
        self.got["http"] = json.loads(reply)["choices"][0]["text"] if status == 200 else status

    def check(self) -> None:
        for t in self.threads:
            t.join(timeout=60)
        assert self.got == self.want


# ---------------------------------------------------------------------------------------------
# disconnects


@pytest.mark.parametrize("how", ["cancel", "close-channel"])
def test_generate_disconnect_mid_stream(served, target, slow_steps, sessions, how):
    good = GoodClients(served, target)
    channel = grpc.insecure_channel(served.address)
    request = pb.GenerateRequest(prompt="Hi", max_new_tokens=250)
    call = pb_grpc.SpeculativeDecodingStub(channel).Generate(request, timeout=60)
    next(call), next(call)
    if how == "cancel":
        call.cancel()
    channel.close()
    good.check()
    faulty = next(s for s in sessions if s.prompt_ids == served.runtime.tokenizer.encode("Hi"))
    wait_for(lambda: faulty.finished)
    assert faulty.finish_reason == "cancelled" and faulty.produced < 250
    wait_all_free(served)
    assert active_sessions(served.runtime) == 0


def test_speculate_disconnect_mid_stream(served, target, slow_steps, sessions):
    """The session waits resume_timeout_s (0.3 s here) for its client, then is cancelled."""
    good = GoodClients(served, target)
    channel = grpc.insecure_channel(served.address)
    requests: queue.Queue = queue.Queue()
    open_ = pb.OpenSession(prompt="Hi", keep_decoding=True)
    open_.sampling.max_new_tokens = 250
    requests.put(pb.SpeculateRequest(open=open_))
    call = pb_grpc.SpeculativeDecodingStub(channel).Speculate(iter(requests.get, None), timeout=60)
    next(call), next(call), next(call)  # opened, two verdicts
    channel.close()
    good.check()
    faulty = next(s for s in sessions if s.external)
    wait_for(lambda: faulty.finished, timeout_s=10)
    assert faulty.finish_reason == "cancelled" and faulty.produced < 250
    wait_all_free(served)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_http_disconnect_mid_answer(served, target, slow_steps, sessions, stream):
    good = GoodClients(served, target)
    body = json.dumps({"prompt": "Hi", "max_tokens": 250, "stream": stream}).encode()
    sock = socket.create_connection(("127.0.0.1", served.http_port), timeout=30)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    if stream:
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
    mine = lambda: [s for s in sessions if s.params.max_new_tokens == 250]  # noqa: E731
    wait_for(lambda: mine() and mine()[0].produced > 0)
    sock.close()
    good.check()
    faulty = mine()[0]
    wait_for(lambda: faulty.finished)
    assert faulty.finish_reason == "cancelled" and faulty.produced < 250
    wait_all_free(served)


# ---------------------------------------------------------------------------------------------
# readers that stall


def stalled_reader_channel(address: str) -> grpc.Channel:
    """A client that grants the server a 1 KiB window and never more while it does not read
    (no bandwidth probing): its streams block on flow control within about 80 responses."""
    options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    return grpc.insecure_channel(address, options=options)


def test_stalled_grpc_reader_is_cut_off(served, target, sessions, monkeypatch):
    """The session runs to its end and frees its KV slot while its reader stalls (the
    scheduler never waits on a reader: its steps wait in the session's queue, at most
    max_new_tokens of them); the stream's thread is freed after the stall timeout, with
    DEADLINE_EXCEEDED."""
    from distspec.server import grpc_guard

    ended = threading.Event()
    end_call = grpc_guard.end_call

    def recording(*args):  # the guard ends the call: only then is reading again too late
        end_call(*args)
        ended.set()

    monkeypatch.setattr(grpc_guard, "end_call", recording)
    prompt = served.runtime.tokenizer.encode("Hi")
    assert len(expected(target, prompt, 250)) == 250  # no EOS: a long answer
    channel = stalled_reader_channel(served.address)
    request = pb.GenerateRequest(prompt="Hi", max_new_tokens=250)
    call = pb_grpc.SpeculativeDecodingStub(channel).Generate(request, timeout=60)
    next(call)  # then stop reading
    good = GoodClients(served, target)
    good.check()  # other sessions go on meanwhile
    stalled = next(s for s in sessions if s.prompt_ids == prompt)
    wait_for(lambda: stalled.finished)
    assert stalled.finish_reason == "length"
    wait_for(lambda: served.runtime.scheduler.state().running == 0)  # its slot is free
    assert 0 < stalled.outputs.qsize() <= 250  # what the reader has not taken
    # not a fixed sleep: on a loaded machine the stream may block on flow control late
    assert ended.wait(60)
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "took no response" in err.value.details()
    channel.close()
    wait_all_free(served)
    assert generate_ids(served, "Hi", 20) == expected(target, prompt, 20)


def test_stalled_http_reader_is_disconnected(served, sessions):
    """The HTTP API's sends wait at most the stall timeout too (driven through ASGI here: a
    tiny model's answer fits in the kernel's socket buffers)."""
    api = HttpApi(served.gateway, "tiny")
    sent: list[dict] = []
    received: list[bool] = []
    blocked = asyncio.Event()

    async def receive():
        if not received:
            received.append(True)
            body = {"prompt": "Hi", "max_tokens": 200, "stream": True}
            return {"type": "http.request", "body": json.dumps(body).encode()}
        await asyncio.Event().wait()  # the client never leaves

    async def send(message):
        sent.append(message)
        if len(sent) >= 3:  # the start and one event reach it, then it stops reading
            blocked.set()
            await asyncio.Event().wait()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5555),
        "server": ("127.0.0.1", 80),
    }

    async def run() -> float:
        t0 = time.monotonic()
        await asyncio.wait_for(api.app(scope, receive, send), STALL_S + 10)
        return time.monotonic() - t0

    took = asyncio.run(run())
    assert blocked.is_set() and STALL_S <= took < STALL_S + 5
    assert sent[0]["status"] == 200 and sent[-1].get("more_body", True)  # cut, not finished
    wait_for(lambda: sessions[0].finished)
    wait_all_free(served)
    api.pool.shutdown()


# ---------------------------------------------------------------------------------------------
# calls that send nothing


def test_idle_speculate_session_is_ended_and_freed(served, target):
    """A session opened without ever sending a draft chunk (stop and wait)."""
    requests: queue.Queue = queue.Queue()
    requests.put(pb.SpeculateRequest(open=pb.OpenSession(prompt="Hello")))
    call = served.stub.Speculate(iter(requests.get, None), timeout=30)
    next(call), next(call)  # opened, the first token
    wait_for(lambda: served.runtime.scheduler.state().running == 1)
    assert active_sessions(served.runtime) == 1
    good = GoodClients(served, target)
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:
            pass
    requests.put(None)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"no draft chunk for {IDLE_S:g} s" in err.value.details()
    good.check()
    wait_all_free(served)


def test_calls_that_never_send_a_request_do_not_starve_the_server(served, target):
    """More silent calls (Generate, Speculate) than the server has threads: each ends after
    the stall timeout, and health checks and good requests get through meanwhile."""
    threads = served.runtime.info.num_slots + served.runtime.config.scheduler.max_waiting + 8
    never: queue.Queue = queue.Queue()  # nothing is ever put: the requests never come
    silent = []
    for i in range(threads + 4):
        method = "Generate" if i % 2 else "Speculate"
        call = served.channel.stream_stream(SERVICE + method)(iter(never.get, None), timeout=30)
        silent.append(call)
    t0 = time.monotonic()
    health = health_pb2_grpc.HealthStub(served.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=STALL_S + 10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    prompt = served.runtime.tokenizer.encode("abc")
    assert generate_ids(served, "abc", 10) == expected(target, prompt, 10)
    for call in silent:
        with pytest.raises(grpc.RpcError) as err:
            next(call)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
        assert "no request message" in err.value.details()
    assert time.monotonic() - t0 < 2 * STALL_S + 10
    for _ in silent:
        never.put(None)  # the client's threads that wait on it
    wait_all_free(served)


def test_http_body_that_never_arrives_gets_408(served):
    sock = socket.create_connection(("127.0.0.1", served.http_port), timeout=30)
    try:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 100\r\n\r\n{"
        )
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    finally:
        sock.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["error"]["code"] == "timeout"
    wait_all_free(served)


def test_health_watchers_hold_no_thread(served, target):
    """Health checking's Watch streams stay open as long as their clients like: the guard
    keeps grpc_health's handler non-blocking, so they do not take a thread each."""
    threads = served.runtime.info.num_slots + served.runtime.config.scheduler.max_waiting + 8
    health = health_pb2_grpc.HealthStub(served.channel)
    request = health_pb2.HealthCheckRequest(service="")
    watches = [health.Watch(request, timeout=30) for _ in range(threads + 4)]
    for watch in watches:
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    assert health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    prompt = served.runtime.tokenizer.encode("abc")
    assert generate_ids(served, "abc", 10) == expected(target, prompt, 10)
    for watch in watches:
        watch.cancel()
    wait_all_free(served)
