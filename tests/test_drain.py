"""Graceful drain of `distspec serve` (a real child process, SIGTERM): new requests are refused
at once (gRPC UNAVAILABLE, HTTP 503, health NOT_SERVING), requests in flight finish with their
exact output, what outlasts --drain-timeout-s ends with UNAVAILABLE saying why, the process
exits 0 and, on Ray, leaves no process of its cluster behind."""

from __future__ import annotations

import http.client
import json
import queue
import signal
import threading
import time

import grpc
import psutil
import pytest
from distspec.v1 import speculative_decoding_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from distspec.bench.grpc_client import chat_request, generate_stub
from distspec.bench.serve_process import ServeProcess, free_port

REFUSED_WITHIN_S = 2.0  # "at once", with room for a loaded 2-core machine


def _generate(stub, request, timeout_s: float = 120) -> list[int]:
    return [t for r in stub.Generate(request, timeout=timeout_s) for t in r.token_ids]


def _assert_refused_now(stub, channel, http_port: int | None = None) -> None:
    t = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        _generate(stub, chat_request("Hello", 4), timeout_s=30)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    assert "shutting down" in refused.value.details()
    assert time.monotonic() - t < REFUSED_WITHIN_S
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    if http_port is not None:
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
        body = json.dumps({"model": "m", "prompt": "Hello", "max_tokens": 4})
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        answer = conn.getresponse()
        assert answer.status == 503
        assert "shutting down" in json.loads(answer.read())["error"]["message"]


def _wait_for_log(server: ServeProcess, text: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = server.log_path.read_text()
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the server's log:\n{server.log_path.read_text()}")


def test_drain_refuses_new_requests_and_ends_what_outlasts_the_timeout(
    tiny_dir, tiny_drafter_dir, tmp_path
):
    """A Speculate session that never offers a chunk stays open until the drain timeout."""
    http_port = free_port()
    args = ["--no-ray", "--target", str(tiny_dir), "--drafter", str(tiny_drafter_dir)]
    args += ["--max-len", "512", "--http-port", str(http_port)]
    server = ServeProcess([*args, "--drain-timeout-s", "3"], tmp_path / "serve.log")
    address = server.start(timeout_s=120)
    try:
        channel = grpc.insecure_channel(address)
        stub = generate_stub(channel)
        requests: queue.Queue = queue.Queue()
        requests.put(pb.SpeculateRequest(open=pb.OpenSession(prompt="Hello")))
        stream = stub.Speculate(iter(requests.get, None), timeout=120)
        assert next(stream).HasField("opened")
        server.proc.send_signal(signal.SIGTERM)
        _wait_for_log(server, "1 request(s) in flight")
        _assert_refused_now(stub, channel, http_port)
        t = time.monotonic()
        with pytest.raises(grpc.RpcError) as ended:
            list(stream)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "drain timeout (3 s)" in ended.value.details()
        assert time.monotonic() - t < 3 + 10
        requests.put(None)
        assert server.proc.wait(60) == 0
        assert "0 finished, 1 ended" in server.log_path.read_text()
    finally:
        server.stop()


@pytest.mark.slow
def test_drain_under_load_on_ray_finishes_in_flight_requests_exactly(tmp_path):
    """The demo pair on a local Ray cluster: four greedy streams in flight at SIGTERM all end
    with the output the same requests had before; then exit 0 and no Ray process is left."""
    args = ["--num-slots", "4", "--max-waiting", "0", "--drain-timeout-s", "120"]
    server = ServeProcess(args, tmp_path / "serve.log")
    address = server.start()
    try:
        channel = grpc.insecure_channel(address)
        stub = generate_stub(channel)
        prompts = ["Name three rivers.", "What is a CPU?"]
        requests = [chat_request(p, 40) for p in prompts]
        expected = [_generate(stub, r) for r in requests]
        tree = psutil.Process(server.pid).children(recursive=True)
        labels = {p.name() for p in tree}
        assert {"gcs_server", "raylet"} <= labels, labels

        outputs: list[list[int]] = [[] for _ in range(4)]
        first = [threading.Event() for _ in range(4)]
        errors: list[Exception] = []

        def client(i: int) -> None:
            try:
                for r in stub.Generate(requests[i % 2], timeout=300):
                    outputs[i] += r.token_ids
                    first[i].set()
            except Exception as e:  # reported below
                errors.append(e)
                first[i].set()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for th in threads:
            th.start()
        assert all(e.wait(120) for e in first)
        server.proc.send_signal(signal.SIGTERM)
        _wait_for_log(server, "request(s) in flight")
        _assert_refused_now(stub, channel)
        for th in threads:
            th.join(300)
        assert not errors, errors
        assert outputs == [expected[i % 2] for i in range(4)]
        assert server.proc.wait(120) == 0
        assert "4 finished" in server.log_path.read_text()
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, [p.name() for p in alive]
    finally:
        server.stop()
