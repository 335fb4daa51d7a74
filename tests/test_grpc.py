"""The gRPC server over real sockets, workers in-process (tiny random models): Generate,
validation, admission, disconnects, health checking and reflection."""

from __future__ import annotations

import dataclasses
import queue
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from distspec.cluster.ray_cluster import ClusterConfig
from distspec.models.tokenizer import ChatMessage
from distspec.scheduler.runtime import Runtime, RuntimeConfig
from distspec.scheduler.scheduler import SchedulerConfig
from distspec.server.grpc_server import GrpcServer
from distspec.v1 import speculative_decoding_pb2 as pb
from distspec.v1 import speculative_decoding_pb2_grpc as pb_grpc
from distspec.workers.drafter import DrafterSpec
from distspec.workers.target import TargetSpec
from test_decoding import greedy_ar

SLOTS = 2


@pytest.fixture(scope="module")
def server(tiny_dir, tiny_drafter_dir):
    cluster = ClusterConfig(
        target=TargetSpec(str(tiny_dir), num_slots=SLOTS, max_len=288),
        drafter=DrafterSpec(str(tiny_drafter_dir), str(tiny_dir), max_len=288),
    )
    scheduler = SchedulerConfig(mode="pearl", max_waiting=1, max_draft=8, idle_timeout_s=120)
    config = RuntimeConfig(cluster, scheduler, use_ray=False)
    runtime = Runtime(config)
    srv = GrpcServer(runtime, port=0, host="127.0.0.1", resume_timeout_s=0.3)
    port = srv.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield runtime, channel
    channel.close()
    srv.stop(grace_s=1)
    runtime.close()


def generate(channel, **fields) -> tuple[list[pb.GenerateResponse], list[int], str]:
    stub = pb_grpc.SpeculativeDecodingStub(channel)
    responses = list(stub.Generate(pb.GenerateRequest(**fields), timeout=60))
    ids = [t for r in responses for t in r.token_ids]
    return responses, ids, "".join(r.text for r in responses)


def test_generate_raw_prompt_equals_greedy_decoding(server, target):
    runtime, channel = server
    responses, ids, text = generate(channel, prompt="Once upon a time", max_new_tokens=30)
    prompt_ids = runtime.tokenizer.encode("Once upon a time")
    assert ids == greedy_ar(target, prompt_ids, 30)
    assert text == runtime.tokenizer.decode(ids)
    last = responses[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    assert last.stats.new_tokens == 30 and last.stats.prompt_tokens == len(prompt_ids)
    assert last.stats.tokens_per_target_forward >= 1.0


def test_generate_messages_apply_the_chat_template(server, target):
    runtime, channel = server
    messages = [pb.ChatMessage(role="user", content="Hi there")]
    _, ids, _ = generate(channel, messages=messages, max_new_tokens=12)
    prompt_ids = runtime.tokenizer.encode_chat([ChatMessage("user", "Hi there")])
    assert ids == greedy_ar(target, prompt_ids, 12)


def test_seeded_sampling_reproduces(server):
    _, channel = server
    a = generate(channel, prompt="Hello", max_new_tokens=20, temperature=1.0, seed=5)[1]
    b = generate(channel, prompt="Hello", max_new_tokens=20, temperature=1.0, seed=5)[1]
    assert a == b


@pytest.mark.parametrize(
    "fields, message",
    [
        ({}, "exactly one of prompt and messages"),
        ({"prompt": "x", "messages": [pb.ChatMessage(role="user", content="y")]}, "exactly one"),
        ({"messages": [pb.ChatMessage(role="robot", content="y")]}, "messages[0].role"),
        ({"messages": [pb.ChatMessage(role="user", content="")]}, "messages[0].content"),
        ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "temperature": float("nan")}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "stop_token_ids": [10**6]}, "stop_token_ids"),
        ({"prompt": "x" * 400}, "context"),
    ],
)
def test_bad_requests_get_invalid_argument(server, fields, message):
    _, channel = server
    with pytest.raises(grpc.RpcError) as err:
        generate(channel, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def wait_for(condition, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_full_server_says_resource_exhausted_and_disconnects_free_slots(server):
    runtime, channel = server
    # two Speculate sessions hold the slots while they have no chunk to verify, a Generate
    # waits; the next request is refused
    holders = [DraftStream(channel, pb.OpenSession(prompt="Hello")) for _ in range(SLOTS)]
    for h in holders:
        next(h.responses)
    stub = pb_grpc.SpeculativeDecodingStub(channel)
    waiting = stub.Generate(pb.GenerateRequest(prompt="Hello", max_new_tokens=5), timeout=60)
    full = lambda: runtime.scheduler.state()  # noqa: E731
    wait_for(lambda: full().running == SLOTS and full().waiting == 1, timeout_s=10.0)
    with pytest.raises(grpc.RpcError) as err:
        generate(channel, prompt="Hello", max_new_tokens=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "busy" in err.value.details()
    assert float(dict(err.value.trailing_metadata())["retry-after-s"]) > 0
    # clients going away cancel their sessions: every slot comes back
    for h in holders:
        h.responses.cancel()
        h.close()
    assert len([t for r in waiting for t in r.token_ids]) == 5  # the waiting one ran
    wait_for(lambda: runtime.scheduler.state().free_slots == SLOTS)
    assert runtime.scheduler.state().waiting == 0


def test_deadline_exceeded_cancels_the_session(server):
    runtime, channel = server
    stub = pb_grpc.SpeculativeDecodingStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        for _ in stub.Generate(pb.GenerateRequest(prompt="Hi", max_new_tokens=250), timeout=0.3):
            time.sleep(0.05)  # a slow reader
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: runtime.scheduler.state().free_slots == SLOTS)


def test_health_and_reflection(server):
    _, channel = server
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "distspec.v1.SpeculativeDecoding"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in reply.list_services_response.service}
    assert "distspec.v1.SpeculativeDecoding" in names
    assert "grpc.health.v1.Health" in names


# ---------------------------------------------------------------------------------------------
# Speculate: an outside drafter streams chunks and reads verdicts


class DraftStream:
    """A Speculate call whose requests are sent one at a time."""

    def __init__(self, channel, open_: pb.OpenSession, timeout=60):
        self._queue: queue.Queue = queue.Queue()
        self._queue.put(pb.SpeculateRequest(open=open_))
        stub = pb_grpc.SpeculativeDecodingStub(channel)
        self.responses = stub.Speculate(iter(self._queue.get, None), timeout=timeout)

    def send(self, position: int, tokens: list[int]) -> None:
        chunk = pb.DraftChunk(position=position, token_ids=tokens)
        self._queue.put(pb.SpeculateRequest(draft=chunk))

    def close(self) -> None:
        self._queue.put(None)


def test_speculate_with_a_right_drafter(server, target):
    runtime, channel = server
    ids = runtime.tokenizer.encode("Once upon a time")
    greedy = greedy_ar(target, ids, 30)
    stream = DraftStream(
        channel,
        pb.OpenSession(prompt="Once upon a time", sampling=pb.SamplingOptions(max_new_tokens=30)),
    )
    opened = next(stream.responses).opened
    assert list(opened.prompt_token_ids) == ids and opened.max_draft_tokens == 8
    out = []
    for response in stream.responses:
        verdict = response.verdict
        assert verdict.position == len(ids) + len(out)
        out += verdict.token_ids
        if verdict.finish_reason:
            break
        # the next chunk: 4 right tokens, then a wrong one
        wrong = (greedy[len(out) + 4] + 1) % 256 if len(out) + 4 < len(greedy) else 0
        stream.send(len(ids) + len(out), greedy[len(out) : len(out) + 4] + [wrong])
    stream.close()
    assert out == greedy
    assert verdict.finish_reason == pb.FINISH_REASON_LENGTH
    assert verdict.stats.accepted_tokens >= 4 * (verdict.stats.target_forwards - 2)
    assert verdict.stats.tokens_per_target_forward > 3


def test_speculate_sampled_chunks_are_token_ids(server):
    _, channel = server
    sampling = pb.SamplingOptions(max_new_tokens=12, temperature=1.0, seed=3)
    stream = DraftStream(channel, pb.OpenSession(prompt="Hello", sampling=sampling))
    next(stream.responses)
    total = 0
    position = None
    for response in stream.responses:
        verdict = response.verdict
        position = verdict.position + len(verdict.token_ids)
        total += len(verdict.token_ids)
        if verdict.finish_reason:
            break
        stream.send(position, [100, 101])
    stream.close()
    assert total == 12


@pytest.mark.parametrize(
    "chunk, message",
    [
        (dict(position=10**4, tokens=[1]), "verified"),
        (dict(position=1, tokens=[1]), "inside the prompt"),
        (dict(tokens=[1] * 9), "at most 8"),
        (dict(tokens=[10**6]), "outside the vocabulary"),
    ],
)
def test_speculate_bad_chunks_get_invalid_argument(server, chunk, message):
    runtime, channel = server
    stream = DraftStream(channel, pb.OpenSession(prompt="Hello"))
    opened = next(stream.responses).opened
    next(stream.responses)  # the first token
    position = chunk.pop("position", len(opened.prompt_token_ids) + 1)
    stream.send(position, **chunk)
    with pytest.raises(grpc.RpcError) as err:
        list(stream.responses)
    stream.close()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    wait_for(lambda: runtime.scheduler.state().free_slots == SLOTS)


def test_speculate_must_open_first(server):
    _, channel = server
    stub = pb_grpc.SpeculativeDecodingStub(channel)
    requests = iter([pb.SpeculateRequest(draft=pb.DraftChunk(position=1, token_ids=[1]))])
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Speculate(requests, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_idle_speculate_session_times_out(server):
    runtime, channel = server
    config = runtime.scheduler.config
    runtime.scheduler.config = dataclasses.replace(config, idle_timeout_s=1.0)
    try:
        stream = DraftStream(channel, pb.OpenSession(prompt="Hello"))
        next(stream.responses)
        next(stream.responses)
        with pytest.raises(grpc.RpcError) as err:
            list(stream.responses)  # no chunk sent: the server ends the session
        stream.close()
    finally:
        runtime.scheduler.config = config
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: runtime.scheduler.state().free_slots == SLOTS)
