"""A tiny in-process server (gRPC and the HTTP API on one gateway, workers in this process)
for the client-fault, hostile-input and deadline tests, and the checks they share: every
session and KV slot free again (scheduler state and the distspec:active_sessions gauge), and
the server still serving the exact greedy output."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from distspec.cluster.ray_cluster import ClusterConfig
from distspec.scheduler.runtime import Runtime, RuntimeConfig
from distspec.scheduler.scheduler import SchedulerConfig
from distspec.server.gateway import Gateway
from distspec.server.grpc_server import GrpcServer
from distspec.server.http_api import HttpServer
from distspec.v1 import speculative_decoding_pb2 as pb
from distspec.v1 import speculative_decoding_pb2_grpc as pb_grpc
from distspec.workers.target import TargetSpec
from test_decoding import greedy_ar
from tiny import EOS_ID

MODEL = "tiny"
MAX_LEN = 288
SERVICE = "/distspec.v1.SpeculativeDecoding/"
BAD_GRPC_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


@dataclass
class Served:
    runtime: Runtime
    gateway: Gateway
    grpc_server: GrpcServer
    http_server: HttpServer
    address: str  # gRPC host:port
    http_port: int
    channel: grpc.Channel

    @property
    def stub(self) -> pb_grpc.SpeculativeDecodingStub:
        return pb_grpc.SpeculativeDecodingStub(self.channel)

    def pool_threads(self) -> int:
        """Threads the two doors may keep: each has a pool of slots + max_waiting + 8."""
        sessions = self.runtime.info.num_slots + self.runtime.config.scheduler.max_waiting
        return 2 * (sessions + 8)


@contextmanager
def serve_tiny(
    model_dir: Path,
    *,
    slots: int = 2,
    max_waiting: int = 2,
    idle_timeout_s: float = 60.0,
    resume_timeout_s: float = 0.5,
    request_timeout_s: float = 0.0,
    stall_timeout_s: float = 60.0,
    tokens: set[str] | None = None,
) -> Iterator[Served]:
    cluster = ClusterConfig(
        target=TargetSpec(str(model_dir), num_slots=slots, max_len=MAX_LEN), drafter=None
    )
    scheduler = SchedulerConfig(
        mode="ar", max_waiting=max_waiting, max_draft=8, idle_timeout_s=idle_timeout_s
    )
    runtime = Runtime(RuntimeConfig(cluster, scheduler, use_ray=False))
    gateway = Gateway(runtime, None, request_timeout_s, stall_timeout_s)
    grpc_server = GrpcServer(
        runtime,
        host="127.0.0.1",
        tokens=tokens,
        resume_timeout_s=resume_timeout_s,
        gateway=gateway,
    )
    address = f"127.0.0.1:{grpc_server.start()}"
    http_server = HttpServer(gateway, host="127.0.0.1", model=MODEL, tokens=tokens, grace_s=1)
    http_port = http_server.start()
    channel = grpc.insecure_channel(address)
    try:
        yield Served(runtime, gateway, grpc_server, http_server, address, http_port, channel)
    finally:
        channel.close()
        http_server.stop()
        grpc_server.stop(grace_s=1)
        runtime.close()


def slow_down(served: Served, monkeypatch, delay_s: float = 0.005) -> None:
    """Each target step takes delay_s more (a tiny model answers 250 tokens in a blink)."""
    worker = served.runtime.target.worker
    step = worker.step

    def slow(*args, **kwargs):
        time.sleep(delay_s)
        return step(*args, **kwargs)

    monkeypatch.setattr(worker, "step", slow)


# -- what must hold after every fault ----------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout_s: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting: {what or condition}"
        time.sleep(0.01)


def active_sessions(runtime: Runtime) -> float:
    """The distspec:active_sessions gauge, from the text a Prometheus scrape gets."""
    text = generate_latest(runtime.scheduler.metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "distspec:active_sessions":
                return sample.value
    raise AssertionError("no distspec:active_sessions in the metrics")


def all_free(runtime: Runtime) -> bool:
    s = runtime.scheduler.state()
    idle = s.free_slots == s.total_slots and s.running == 0 and s.waiting == 0
    return idle and active_sessions(runtime) == 0


def wait_all_free(served: Served, timeout_s: float = 15.0) -> None:
    """No session left, every KV slot free (scheduler state and metrics), no client still
    counted, no Speculate reader thread left."""
    runtime = served.runtime
    wait_for(lambda: all_free(runtime), timeout_s, f"free slots: {runtime.scheduler.state()}")
    ledger = served.gateway.ledger
    wait_for(lambda: not any(ledger._open.values()), timeout_s, "client session counts")
    readers = lambda: [t for t in threading.enumerate() if t.name.startswith("speculate-")]  # noqa: E731
    wait_for(lambda: not readers(), timeout_s, "Speculate reader threads")


def expected(target, prompt_ids: list[int], n: int) -> list[int]:
    """The greedy tokens the server gives: n, or up to and with the first EOS."""
    ids = greedy_ar(target, prompt_ids, n)
    return ids[: ids.index(EOS_ID) + 1] if EOS_ID in ids else ids


def generate_ids(served: Served, prompt: str, n: int, metadata=()) -> list[int]:
    request = pb.GenerateRequest(prompt=prompt, max_new_tokens=n)
    responses = served.stub.Generate(request, timeout=60, metadata=metadata)
    return [t for r in responses for t in r.token_ids]


def assert_serving(served: Served, target, metadata=()) -> None:
    """Health says SERVING and a good request gets exactly the greedy output, on both doors."""
    health = health_pb2_grpc.HealthStub(served.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    ids = served.runtime.tokenizer.encode("Hello")
    want = expected(target, ids, 12)
    assert generate_ids(served, "Hello", 12, metadata) == want
    headers = dict(metadata)
    status, body = http_request(
        served, "POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 12}, headers
    )
    assert status == 200, body
    assert json.loads(body)["choices"][0]["text"] == served.runtime.tokenizer.decode(want)


def http_request(
    served: Served, method: str, path: str, body=None, headers=None, port: int | None = None
) -> tuple[int, bytes]:
    """(status, body) of one request; body: bytes as they are, else JSON; port: another
    door than served's."""
    conn = http.client.HTTPConnection("127.0.0.1", port or served.http_port, timeout=60)
    try:
        data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
        all_headers = {"content-type": "application/json", **(headers or {})}
        conn.request(method, path, data, all_headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def grpc_code(call: Callable[[], object]) -> grpc.StatusCode:
    """The status a call ends with (iterating a stream to its end)."""
    try:
        result = call()
        if isinstance(result, Iterator):
            for _ in result:
                pass
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK
