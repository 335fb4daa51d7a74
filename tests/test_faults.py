"""Worker faults on a real local Ray cluster: a target rank, the target leader or a drafter
actor is killed while sessions stream. The runtime rebuilds what broke and every session,
greedy or seeded sampled, ends with exactly the tokens it would have had (a sampled token is
the target's draw with the noise of its seed and position, whoever computes it); new requests
succeed afterwards."""

from __future__ import annotations

import time

import pytest

from distspec.cluster.ray_cluster import ClusterConfig
from distspec.models.loader import load_model
from distspec.scheduler.runtime import Runtime, RuntimeConfig
from distspec.scheduler.scheduler import SchedulerConfig
from distspec.spec_decode.sampling import SamplingParams
from distspec.workers.drafter import DrafterSpec
from distspec.workers.target import TargetSpec
from test_decoding import greedy_ar

pytestmark = pytest.mark.slow

NEW_TOKENS = 120
MAX_LEN = 256
PROMPTS = ["Hello", "abcabcabc", "Once upon a", "The quick brown fox"]


@pytest.fixture(scope="module")
def runtime(tiny_dir, tiny_drafter_dir):
    cluster = ClusterConfig(
        target=TargetSpec(str(tiny_dir), num_slots=4, max_len=MAX_LEN),
        target_tp=2,
        drafter=DrafterSpec(str(tiny_drafter_dir), str(tiny_dir), max_len=MAX_LEN, lookup=False),
    )
    rt = Runtime(RuntimeConfig(cluster, SchedulerConfig(mode="sd", gamma=3)))
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def reference(tiny_dir):
    target = load_model(str(tiny_dir), max_len=MAX_LEN)
    ids = [target.tokenizer.encode(p) for p in PROMPTS]
    expected = []
    for prompt in ids:
        out = greedy_ar(target, prompt, NEW_TOKENS)
        eos = [i for i, t in enumerate(out) if t in target.tokenizer.eos_token_ids]
        expected.append(out[: eos[0] + 1] if eos else out)
    return ids, expected


def _kill(actor) -> None:
    import ray

    ray.kill(actor, no_restart=True)


def _stream_with_fault(runtime, reference, kill, mode: str) -> float:
    """Start every prompt, kill once each session has tokens, read all to the end; returns
    the seconds from the kill to the next tokens."""
    ids, expected = reference
    scheduler = runtime.scheduler
    scheduler.set_mode(mode)
    repairs = scheduler.counters["repairs"]
    sessions = [scheduler.submit(p, SamplingParams(max_new_tokens=NEW_TOKENS)) for p in ids]
    streams = [s.stream(timeout_s=120) for s in sessions]
    outputs = [list(next(stream).token_ids) for stream in streams]
    kill()
    killed = time.perf_counter()
    recovered = None
    for out, stream in zip(outputs, streams, strict=True):
        for step in stream:
            if step.token_ids and recovered is None:
                recovered = time.perf_counter() - killed
            out += step.token_ids
    assert outputs == expected
    assert scheduler.counters["repairs"] == repairs + 1
    return recovered or 0.0


@pytest.mark.parametrize("rank", [1, 0])
def test_a_dead_target_rank_is_rebuilt_and_sessions_finish_exactly(runtime, reference, rank):
    seconds = _stream_with_fault(
        runtime, reference, lambda: _kill(runtime.cluster.target.actors[rank]), "sd"
    )
    print(f"target rank {rank} killed: tokens again after {seconds:.1f} s")
    _new_requests_succeed(runtime, reference)


def test_a_dead_drafter_degrades_to_lookup_then_comes_back(runtime, reference):
    first_drafter = runtime.scheduler.drafters[0]
    seconds = _stream_with_fault(
        runtime, reference, lambda: _kill(runtime.cluster.drafters[0].actors[0]), "pearl"
    )
    print(f"drafter killed: tokens again after {seconds:.1f} s")
    deadline = time.time() + 120
    while runtime.scheduler.drafters[0] is first_drafter or not runtime.scheduler.drafters[0].actor:
        assert time.time() < deadline, "the drafter was not rebuilt"
        _new_requests_succeed(runtime, reference)  # meanwhile prompt lookup drafts
    before = runtime.scheduler.counters["draft_tokens"]
    _new_requests_succeed(runtime, reference)
    assert runtime.scheduler.counters["draft_tokens"] > before


def test_a_seeded_sampled_stream_resumes_exactly_over_grpc(runtime, reference):
    """Through the gRPC front door: a seeded sampled stream cut by a dead target rank goes on
    on the rebuilt one and gives the tokens the same request gives undisturbed; a greedy
    stream running at the same time finishes exactly."""
    import grpc

    from distspec.server.grpc_server import GrpcServer
    from distspec.v1 import speculative_decoding_pb2 as pb
    from distspec.v1 import speculative_decoding_pb2_grpc as pb_grpc

    _, expected = reference
    runtime.scheduler.set_mode("sd")
    server = GrpcServer(runtime, port=0, host="127.0.0.1")
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SpeculativeDecodingStub(channel)

            def request(prompt: str, **sampling) -> pb.GenerateRequest:
                return pb.GenerateRequest(prompt=prompt, max_new_tokens=NEW_TOKENS, **sampling)

            def tokens(responses) -> list[int]:
                return [t for r in responses for t in r.token_ids]

            sampled = request(PROMPTS[0], temperature=1.0, seed=7)
            undisturbed = tokens(stub.Generate(sampled, timeout=120))
            seeded = stub.Generate(sampled, timeout=120)
            greedy = stub.Generate(request(PROMPTS[1]), timeout=120)
            out = list(next(greedy).token_ids)
            seeded_out = list(next(seeded).token_ids)
            repairs = runtime.scheduler.counters["repairs"]
            _kill(runtime.cluster.target.actors[1])
            seeded_out += tokens(seeded)
            out += tokens(greedy)
            assert runtime.scheduler.counters["repairs"] == repairs + 1
            assert seeded_out == undisturbed
            assert out == expected[1]
    finally:
        server.stop(grace_s=1)
    _new_requests_succeed(runtime, reference)


def _new_requests_succeed(runtime, reference) -> None:
    ids, expected = reference
    session = runtime.scheduler.submit(ids[2], SamplingParams(max_new_tokens=NEW_TOKENS))
    out = [t for step in session.stream(timeout_s=120) for t in step.token_ids]
    assert out == expected[2]


def test_an_idle_cluster_notices_a_dead_rank_within_seconds(runtime, reference):
    repairs = runtime.scheduler.counters["repairs"]
    _kill(runtime.cluster.target.actors[1])
    killed = time.perf_counter()
    while runtime.scheduler.counters["repairs"] == repairs:
        assert time.perf_counter() - killed < 60, "the dead rank went unnoticed"
        time.sleep(0.1)
    print(f"idle: noticed and rebuilt within {time.perf_counter() - killed:.1f} s")
    _new_requests_succeed(runtime, reference)
