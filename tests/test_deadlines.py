"""Deadlines: the client's (gRPC) and the server's request timeout (one setting on the
gateway, for both doors). Either ends the request with DEADLINE_EXCEEDED (HTTP: 504, or an
error event once a stream has begun) and frees its session and KV slot at once, whether it
was running or still waiting for a slot."""

from __future__ import annotations

import json
import queue
import time

import grpc
import pytest

from distspec.cli import build_parser
from distspec.server.serve import ServeConfig
from distspec.spec_decode.sampling import SamplingParams
from distspec.v1 import speculative_decoding_pb2 as pb
from served import (
    active_sessions,
    expected,
    generate_ids,
    http_request,
    serve_tiny,
    slow_down,
    wait_all_free,
    wait_for,
)

C = grpc.StatusCode


@pytest.fixture(scope="module")
def served(tiny_dir):
    # a long resume window: a Speculate stream out of time must not wait for its client
    with serve_tiny(tiny_dir, slots=2, max_waiting=2, resume_timeout_s=30.0) as s:
        yield s


@pytest.fixture
def slow(served, monkeypatch):
    """250 tokens take over 2.5 s."""
    slow_down(served, monkeypatch, 0.01)


@pytest.fixture
def request_timeout(served, monkeypatch):
    def set_timeout(seconds: float) -> None:
        monkeypatch.setattr(served.gateway, "request_timeout_s", seconds)

    return set_timeout


@pytest.fixture
def slots_taken(served):
    """Both KV slots held by sessions that never get a draft chunk: a request waits."""
    scheduler = served.runtime.scheduler
    ids = served.runtime.tokenizer.encode("Hello")
    params = SamplingParams(max_new_tokens=5)
    holders = [scheduler.submit(ids, params, external=True) for _ in range(2)]
    wait_for(lambda: scheduler.state().running == 2)
    yield
    for h in holders:
        scheduler.cancel(h.id)


def open_speculate(served, timeout: float, open_: pb.OpenSession | None = None):
    """A stop-and-wait session that gets no chunk: it holds its slot, making no progress."""
    requests: queue.Queue = queue.Queue()
    requests.put(pb.SpeculateRequest(open=open_ or pb.OpenSession(prompt="Hello")))
    call = served.stub.Speculate(iter(requests.get, None), timeout=timeout)
    return call, requests


def ends_with(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:
            pass
    return err.value


# ---------------------------------------------------------------------------------------------
# the client's deadline


def generated(served) -> float:
    return served.runtime.scheduler.metrics.registry.get_sample_value(
        "vllm:generation_tokens_total"
    )


def test_generate_client_deadline_while_running(served, slow):
    before = generated(served)
    call = served.stub.Generate(pb.GenerateRequest(prompt="Hi", max_new_tokens=250), timeout=0.5)
    assert ends_with(call).code() == C.DEADLINE_EXCEEDED
    wait_all_free(served)
    assert active_sessions(served.runtime) == 0
    # ended soon after the deadline, not at the answer's end (counted, not timed: a loaded
    # machine may take a while, but it must not have generated the rest)
    assert generated(served) - before < 200


def test_generate_client_deadline_while_waiting(served, slots_taken):
    call = served.stub.Generate(pb.GenerateRequest(prompt="Hi", max_new_tokens=5), timeout=0.5)
    assert ends_with(call).code() == C.DEADLINE_EXCEEDED
    wait_for(lambda: served.runtime.scheduler.state().waiting == 0, timeout_s=2)
    assert active_sessions(served.runtime) == 2  # the holders only


def test_speculate_client_deadline_frees_the_session_at_once(served):
    """No resume window for a stream that ran out of time: the client said it is over."""
    call, requests = open_speculate(served, timeout=0.5)
    next(call), next(call)  # opened, the first token; then nothing without chunks
    wait_for(lambda: active_sessions(served.runtime) == 1)
    assert ends_with(call).code() == C.DEADLINE_EXCEEDED
    requests.put(None)
    wait_all_free(served, timeout_s=3)  # not the 30 s resume window


# ---------------------------------------------------------------------------------------------
# the server's request timeout


def test_generate_past_the_request_timeout(served, slow, request_timeout):
    request_timeout(0.5)
    t0, before = time.monotonic(), generated(served)
    call = served.stub.Generate(pb.GenerateRequest(prompt="Hi", max_new_tokens=250), timeout=30)
    error = ends_with(call)
    assert error.code() == C.DEADLINE_EXCEEDED
    assert "server's limit of 0.5 s" in error.details()
    assert time.monotonic() - t0 >= 0.5
    wait_all_free(served)
    assert generated(served) - before < 200  # ended at the limit, not at the answer's end


def test_waiting_counts_toward_the_request_timeout(served, slots_taken, request_timeout):
    request_timeout(0.3)
    call = served.stub.Generate(pb.GenerateRequest(prompt="Hi", max_new_tokens=5), timeout=30)
    assert ends_with(call).code() == C.DEADLINE_EXCEEDED
    assert served.runtime.scheduler.state().waiting == 0
    assert active_sessions(served.runtime) == 2  # the holders only


def test_speculate_past_the_request_timeout(served, request_timeout):
    request_timeout(0.5)
    call, requests = open_speculate(served, timeout=30)
    opened = next(call).opened
    next(call)
    error = ends_with(call)
    requests.put(None)
    assert error.code() == C.DEADLINE_EXCEEDED and "server's limit" in error.details()
    wait_all_free(served, timeout_s=2)
    # resuming it says so too (not a quiet "cancelled" verdict)
    resume = pb.OpenSession(
        resume_session_id=opened.session_id,
        resume_secret=opened.resume_secret,
        resume_position=len(opened.prompt_token_ids),
    )
    call, requests = open_speculate(served, timeout=30, open_=resume)
    assert ends_with(call).code() == C.DEADLINE_EXCEEDED
    requests.put(None)
    wait_all_free(served)


def test_http_past_the_request_timeout_is_504(served, slow, request_timeout):
    """504, not 408: the request came in time; the answer took longer than allowed."""
    request_timeout(0.5)
    body = {"prompt": "Hi", "max_tokens": 250}
    status, reply = http_request(served, "POST", "/v1/completions", body)
    assert status == 504
    error = json.loads(reply)["error"]
    assert error["code"] == "request_timeout" and error["type"] == "server_error"
    assert "server's limit of 0.5 s" in error["message"]
    wait_all_free(served, timeout_s=2)


def test_http_stream_past_the_request_timeout_ends_with_an_error_event(
    served, slow, request_timeout
):
    request_timeout(0.5)
    body = {"prompt": "Hi", "max_tokens": 250, "stream": True}
    status, reply = http_request(served, "POST", "/v1/completions", body)
    assert status == 200  # the stream had begun
    *chunks, error, done = reply.decode().strip().split("\n\n")
    assert done == "data: [DONE]"
    assert json.loads(error.removeprefix("data: "))["error"]["code"] == "request_timeout"
    assert chunks and all("error" not in json.loads(c.removeprefix("data: ")) for c in chunks)
    wait_all_free(served, timeout_s=2)


def test_requests_within_the_timeout_are_untouched(served, target, request_timeout):
    request_timeout(30)
    ids = served.runtime.tokenizer.encode("Hello")
    assert generate_ids(served, "Hello", 40) == expected(target, ids, 40)
    wait_all_free(served)


# ---------------------------------------------------------------------------------------------
# the settings


def test_timeout_settings():
    args = build_parser().parse_args(
        ["serve", "--request-timeout-s", "7", "--stall-timeout-s", "0"]
    )
    assert args.request_timeout_s == 7 and args.stall_timeout_s == 0
    config = ServeConfig.from_dict({"request_timeout_s": 7, "stall_timeout_s": 0})
    assert config.request_timeout_s == 7 and config.stall_timeout_s == 0
    assert ServeConfig().request_timeout_s == 0 and ServeConfig().stall_timeout_s == 60
    for name in ("request_timeout_s", "stall_timeout_s"):
        with pytest.raises(ValueError, match=name):
            ServeConfig.from_dict({name: -1})
