"""The edge client against a real gRPC server through a delaying TCP relay (tiny models)."""

from __future__ import annotations

import json
import socket
import time

import grpc
import pytest

from distspec.bench.relay import DelayRelay
from distspec.cli import main
from distspec.cluster.ray_cluster import ClusterConfig
from distspec.edge_client import EdgeClient
from distspec.scheduler.runtime import Runtime, RuntimeConfig
from distspec.scheduler.scheduler import SchedulerConfig
from distspec.server.grpc_server import GrpcServer
from distspec.spec_decode.drafters.factory import load_drafter, new_drafter
from distspec.spec_decode.sampling import SamplingParams
from distspec.workers.target import TargetSpec
from test_decoding import PROMPTS, greedy_ar


@pytest.fixture(scope="module")
def server(tiny_dir):
    """A server without drafters of its own: edge clients bring theirs."""
    cluster = ClusterConfig(
        target=TargetSpec(str(tiny_dir), num_slots=4, max_len=288), drafter=None
    )
    runtime = Runtime(RuntimeConfig(cluster, SchedulerConfig(mode="ar"), use_ray=False))
    srv = GrpcServer(runtime, port=0, host="127.0.0.1")
    port = srv.start()
    yield runtime, f"127.0.0.1:{port}"
    srv.stop(grace_s=1)
    runtime.close()


def edge_drafter(tiny_dir, tiny_drafter_dir, kind: str):
    if kind == "ngram":
        return new_drafter(None)
    return new_drafter(load_drafter(str(tiny_drafter_dir), str(tiny_dir), max_len=288))


def collect(client: EdgeClient, params: SamplingParams, prompt: str):
    steps = list(client.generate(params, prompt=prompt))
    return [t for s in steps for t in s.token_ids], steps[-1]


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("kind", ["model", "ngram"])
def test_edge_greedy_equals_greedy_decoding_through_the_relay(
    server, target, tiny_dir, tiny_drafter_dir, kind, overlap
):
    runtime, address = server
    relay = DelayRelay(address, delay_s=0.005).start()
    client = EdgeClient(
        relay.address, edge_drafter(tiny_dir, tiny_drafter_dir, kind), gamma=4, overlap=overlap
    )
    try:
        drafted = 0
        for text in PROMPTS:
            ids, last = collect(client, SamplingParams(max_new_tokens=40), text)
            assert ids == greedy_ar(target, runtime.tokenizer.encode(text), 40), text
            assert last.finish_reason == "length"
            # two one-way delays of 5 ms (with overlap the tiny target may decode all 40
            # tokens, about 1 ms each, before any chunk's verdict is back: no round then)
            assert last.stats.rtt_ms >= 10 or (overlap and last.stats.rounds == 0)
            drafted += last.stats.draft_tokens
        assert drafted > 0 or overlap  # stop-and-wait verifies every chunk
    finally:
        client.close()
        relay.stop()


class Oracle:
    """A drafter that knows the target's greedy continuation (every chunk accepted)."""

    name = "oracle"

    def __init__(self, sequence):
        self.sequence = sequence

    def start(self, prompt_ids, params):
        pass

    def propose(self, context, k):
        from distspec.spec_decode.drafter import Draft

        if context != self.sequence[: len(context)]:
            return Draft([0] * k)  # after a wrong guess: wrong drafts
        return Draft(self.sequence[len(context) : len(context) + k])

    def finish(self):
        pass


def slow_down(runtime, monkeypatch, step_s: float = 0.003) -> None:
    """The tiny target decodes a token in about 1 ms: with keep_decoding it can decode past a
    whole chunk before the chunk arrives, so whether any chunk adds tokens depended on
    timing. At 3 ms a step the chunks of these tests stay ahead of it."""
    worker = runtime.target.worker
    step = worker.step
    monkeypatch.setattr(worker, "step", lambda items: time.sleep(step_s) or step(items))


def test_overlap_hides_the_round_trip(server, target, monkeypatch):
    """With a drafter that is always right: stop-and-wait pays a round trip per chunk; with
    overlap the server decodes while chunks travel, and chunks that arrive late still add
    their tokens beyond the ones decoded meanwhile."""
    runtime, address = server
    slow_down(runtime, monkeypatch)
    ids = runtime.tokenizer.encode("Once upon a time")
    greedy = greedy_ar(target, ids, 80)
    relay = DelayRelay(address, delay_s=0.002).start()
    try:
        results = {}
        for overlap in (True, False):
            client = EdgeClient(relay.address, Oracle(ids + greedy), gamma=4, overlap=overlap)
            out, last = collect(client, SamplingParams(max_new_tokens=80), "Once upon a time")
            client.close()
            assert out == greedy
            results[overlap] = last.stats
        fast, slow = results[True], results[False]
        assert slow.hidden_rtt_fraction == 0.0 and fast.hidden_rtt_fraction > 0
        assert fast.accepted_tokens > 0  # chunks arriving late were matched and verified
        assert fast.prepared_chunks > 0  # drafted during the previous chunk's flight
        assert fast.rtt_ms >= 4 and slow.rtt_ms >= 4
    finally:
        relay.stop()


def test_keep_decoding_matches_stale_chunks(server, target, monkeypatch):
    """A chunk that follows fewer tokens than are verified: its overlap must match the
    verified tokens (the rest is verified as a draft), else it is dropped."""
    import queue

    import grpc

    from distspec.v1 import speculative_decoding_pb2 as pb
    from distspec.v1 import speculative_decoding_pb2_grpc as pb_grpc

    runtime, address = server
    slow_down(runtime, monkeypatch)
    ids = runtime.tokenizer.encode("Hello")
    greedy = greedy_ar(target, ids, 40)
    requests: queue.Queue = queue.Queue()
    open_ = pb.OpenSession(prompt="Hello", keep_decoding=True)
    open_.sampling.max_new_tokens = 40
    requests.put(pb.SpeculateRequest(open=open_))
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.SpeculativeDecodingStub(channel)
        responses = stub.Speculate(iter(requests.get, None), timeout=60)
        next(responses)
        out, sent = [], 0
        for r in responses:
            out += r.verdict.token_ids
            if r.verdict.finish_reason:
                break
            if len(out) >= 10 and sent == 0:  # a right chunk of 16, 5 tokens stale
                p = len(ids) + len(out) - 5
                requests.put(
                    pb.SpeculateRequest(
                        draft=pb.DraftChunk(
                            position=p, token_ids=greedy[len(out) - 5 : len(out) + 11]
                        )
                    )
                )
                sent = 1
            elif r.verdict.chunk_done and sent == 1:  # a wrong one: dropped
                p = len(ids) + len(out) - 2
                requests.put(
                    pb.SpeculateRequest(draft=pb.DraftChunk(position=p, token_ids=[0, 0, 0]))
                )
                sent = 2
        requests.put(None)
    assert out == greedy
    assert r.verdict.stats.accepted_tokens >= 1


def test_edge_sampling_is_seeded(server, tiny_dir, tiny_drafter_dir, monkeypatch):
    runtime, address = server
    slow_down(runtime, monkeypatch)
    client = EdgeClient(address, edge_drafter(tiny_dir, tiny_drafter_dir, "model"), gamma=3)
    try:
        params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=9)
        a, last = collect(client, params, "Hello")
        b, _ = collect(client, params, "Hello")
        assert a == b and len(a) == 24
        assert last.stats.draft_tokens > 0
    finally:
        client.close()


def test_relay_adds_its_delay_and_drops():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    relay = DelayRelay(f"127.0.0.1:{listener.getsockname()[1]}", delay_s=0.05).start()
    try:
        client = socket.create_connection(("127.0.0.1", relay.port))
        conn, _ = listener.accept()
        t = time.perf_counter()
        client.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        conn.sendall(b"pong")
        assert client.recv(4) == b"pong"
        # the delay both ways; the upper bound only catches a gross excess (a loaded machine)
        assert 0.1 <= time.perf_counter() - t < 1.0
        relay.drop()
        client.settimeout(5)
        assert client.recv(4) == b""  # the relay cut the connection
    finally:
        relay.stop()
        listener.close()


def test_edge_cli_json(capsys, server, tiny_dir):
    _, address = server
    rc = main(
        ["edge", "--server", address, "--prompt", "abcabc", "--raw", "--drafter", "ngram"]
        + ["--target", str(tiny_dir), "--max-new-tokens", "10", "--json"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads(out)
    assert len(result["token_ids"]) == result["stats"]["new_tokens"] == 10
    assert {"rtt_ms", "hidden_rtt_fraction", "tokens_per_s"} <= set(result["stats"])


def test_a_self_drafter_on_the_device_is_checked_against_the_target(
    capsys, server, target, tiny_dir, tiny_drafter_dir, tmp_path
):
    """--drafter self: the device quantizes its own copy of the model file; the server checks
    the copy's vocabulary and weights fingerprint against its target before verifying.
    Stop-and-wait: every chunk is verified (with overlap the tiny target can decode past
    chunks before they arrive, so whether any is accepted depends on timing)."""
    _, address = server
    args = ["edge", "--server", address, "--prompt", "abcabc", "--raw", "--drafter", "self"]
    args.append("--no-overlap")
    rc = main([*args, "--target", str(tiny_dir), "--max-new-tokens", "24", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert result["token_ids"] == greedy_ar(target, target.tokenizer.encode("abcabc"), 24)
    assert result["stats"]["accepted_tokens"] > 0
    # a copy of another model with the same tokenizer: refused, one line
    rc = main([*args, "--target", str(tiny_drafter_dir)])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "Traceback" not in err
    assert "INVALID_ARGUMENT" in err and "copy of another model" in err


def test_the_server_refuses_a_drafter_of_another_vocabulary(server, tiny_dir):
    from distspec.models.identity import ModelIdentity, model_identity

    runtime, address = server
    ours = model_identity(str(tiny_dir), runtime.tokenizer, runtime.info.vocab_size)
    assert ours.weights and len(ours.vocab_sha256) == 64
    for other, words in [
        (ModelIdentity(ours.vocab_size + 1, ours.vocab_sha256), "vocabulary"),
        (ModelIdentity(ours.vocab_size, "0" * 64), "vocabulary"),
        (ModelIdentity(ours.vocab_size, ours.vocab_sha256, "f" * 32), "copy of another model"),
    ]:
        client = EdgeClient(address, new_drafter(None), drafter_model=other)
        with pytest.raises(grpc.RpcError) as e:
            collect(client, SamplingParams(max_new_tokens=4), "hi")
        client.close()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details()
    client = EdgeClient(address, new_drafter(None), drafter_model=ours)  # the same model
    try:
        assert len(collect(client, SamplingParams(max_new_tokens=4), "hi")[0]) == 4
    finally:
        client.close()


def test_edge_cli_unreachable_server_is_one_line(capsys, tiny_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = main(
        ["edge", "--server", f"127.0.0.1:{port}", "--prompt", "hi", "--drafter", "ngram"]
        + ["--target", str(tiny_dir)]
    )
    err = capsys.readouterr().err
    assert rc != 0 and "UNAVAILABLE" in err and "Traceback" not in err
    assert err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# resilience: a broken stream is resumed from the last verified token


@pytest.mark.parametrize("overlap", [True, False])
def test_dropped_connection_resumes_with_the_same_output(
    server, target, tiny_dir, tiny_drafter_dir, overlap
):
    runtime, address = server
    relay = DelayRelay(address, delay_s=0.002).start()
    client = EdgeClient(
        relay.address, edge_drafter(tiny_dir, tiny_drafter_dir, "model"), overlap=overlap
    )
    try:
        expected = greedy_ar(target, runtime.tokenizer.encode("Once upon a time"), 120)
        out = []
        params = SamplingParams(max_new_tokens=120)
        for i, step in enumerate(client.generate(params, prompt="Once upon a time")):
            out += step.token_ids
            if i in (2, 8):
                relay.drop()  # the link fails twice mid-generation
        assert out == expected
        assert step.stats.reconnects >= 1  # (overlap: the server may finish while cut off)
        assert step.finish_reason == "length"
    finally:
        client.close()
        relay.stop()


def test_a_connection_cut_before_the_session_opened_opens_it_again(
    server, target, tiny_dir, tiny_drafter_dir
):
    """Cut while the OpenSession is still on its way (nothing verified yet): the client
    retries with a fresh session instead of failing the request with UNAVAILABLE."""
    import threading

    runtime, address = server
    relay = DelayRelay(address, delay_s=0.3).start()  # the reply to the open takes >= 0.6 s

    def cut():
        relay.drop()
        relay.delay_s = 0.002

    timer = threading.Timer(0.15, cut)
    client = EdgeClient(relay.address, edge_drafter(tiny_dir, tiny_drafter_dir, "model"))
    try:
        expected = greedy_ar(target, runtime.tokenizer.encode("Once upon a time"), 30)
        out = []
        timer.start()
        for step in client.generate(SamplingParams(max_new_tokens=30), prompt="Once upon a time"):
            out += step.token_ids
        assert out == expected
        assert step.stats.reconnects >= 1
    finally:
        timer.cancel()
        client.close()
        relay.stop()


def test_resume_needs_the_sessions_secret(server):
    import queue

    import grpc

    from distspec.v1 import speculative_decoding_pb2 as pb
    from distspec.v1 import speculative_decoding_pb2_grpc as pb_grpc

    _, address = server
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.SpeculativeDecodingStub(channel)
        requests: queue.Queue = queue.Queue()
        requests.put(pb.SpeculateRequest(open=pb.OpenSession(prompt="Hello")))
        owner = stub.Speculate(iter(requests.get, None), timeout=30)
        opened = next(owner).opened
        assert opened.resume_secret
        for session_id, secret in [(opened.session_id, "guess"), ("999", opened.resume_secret)]:
            resume = pb.OpenSession(
                resume_session_id=session_id,
                resume_secret=secret,
                resume_position=len(opened.prompt_token_ids),
            )
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Speculate(iter([pb.SpeculateRequest(open=resume)]), timeout=10))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert next(owner).verdict.token_ids  # the owner's session is unharmed
        requests.put(None)
        owner.cancel()


# ---------------------------------------------------------------------------------------------
# sampling over the wire is exact; bad clients do not harm good ones


@pytest.fixture(scope="module")
def small_server(small):
    """A server for the 8-token-vocabulary target of the `small` pair."""
    tgt, _ = small
    cluster = ClusterConfig(target=TargetSpec(str(tgt.path), num_slots=8, max_len=64), drafter=None)
    runtime = Runtime(RuntimeConfig(cluster, SchedulerConfig(mode="ar"), use_ray=False))
    srv = GrpcServer(runtime, port=0, host="127.0.0.1")
    port = srv.start()
    yield f"127.0.0.1:{port}"
    srv.stop(grace_s=1)
    runtime.close()


# chi-square over thousands of sampled runs: minutes on 2 cores (make test runs it; test-fast
# keeps the verifier's own statistical tests, test_verify.py)
@pytest.mark.slow
@pytest.mark.parametrize("overlap", [False, True])
def test_edge_sampling_matches_the_target_distribution(small, small_server, overlap):
    """Sampled drafts travel with their sparse q (the drafter's top-k truncation)."""
    from collections import Counter

    from distspec.spec_decode.drafters import ModelDrafter
    from test_decoding import ALPHA, SMALL_PROMPT, exact_joint, gof_pvalue, marginal

    tgt, dft = small
    client = EdgeClient(small_server, ModelDrafter(dft.model), gamma=2, overlap=overlap)
    params = SamplingParams(max_new_tokens=4, temperature=1.0)
    counts, drafted, accepted = Counter(), 0, 0
    try:
        for seed in range(1500):
            p = SamplingParams(max_new_tokens=4, temperature=1.0, seed=600_000 + seed)
            steps = list(client.generate(p, prompt_token_ids=SMALL_PROMPT))
            out = [t for s in steps for t in s.token_ids]
            counts[tuple(out[:3])] += 1
            drafted += steps[-1].stats.draft_tokens
            accepted += steps[-1].stats.accepted_tokens
    finally:
        client.close()
    assert drafted > 0 and 0 < accepted < drafted
    exact = exact_joint(tgt.model, SMALL_PROMPT, params)
    pvalues = [gof_pvalue(counts, exact)]
    pvalues += [gof_pvalue(marginal(counts, i), marginal(exact, i)) for i in range(3)]
    print(f"edge overlap={overlap}: p = {', '.join(f'{p:.3g}' for p in pvalues)}")
    assert min(pvalues) > ALPHA


def test_bad_clients_do_not_harm_a_good_session(server, target, tiny_dir, tiny_drafter_dir):
    import queue
    import threading

    import grpc

    from distspec.v1 import speculative_decoding_pb2 as pb
    from distspec.v1 import speculative_decoding_pb2_grpc as pb_grpc

    runtime, address = server
    relay = DelayRelay(address, delay_s=0.003).start()
    good = EdgeClient(relay.address, edge_drafter(tiny_dir, tiny_drafter_dir, "model"))
    result = {}

    def run_good():
        steps = list(good.generate(SamplingParams(max_new_tokens=150), prompt="Once upon a time"))
        result["out"] = [t for s in steps for t in s.token_ids]

    thread = threading.Thread(target=run_good)
    thread.start()
    bad_chunks = [
        pb.DraftChunk(position=10**6, token_ids=[1]),  # a position never reached
        pb.DraftChunk(position=20, token_ids=[10**7]),  # a token outside the vocabulary
        pb.DraftChunk(position=20, token_ids=[1] * 100),  # oversized
    ]
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.SpeculativeDecodingStub(channel)
            for chunk in bad_chunks:
                requests: queue.Queue = queue.Queue()
                requests.put(pb.SpeculateRequest(open=pb.OpenSession(prompt="Hi there, friend")))
                responses = stub.Speculate(iter(requests.get, None), timeout=30)
                next(responses)
                requests.put(pb.SpeculateRequest(draft=chunk))
                with pytest.raises(grpc.RpcError) as err:
                    list(responses)
                requests.put(None)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # resuming someone else's session
            resume = pb.OpenSession(resume_session_id="1", resume_secret="x", resume_position=3)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Speculate(iter([pb.SpeculateRequest(open=resume)]), timeout=10))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        thread.join(timeout=60)
        expected = greedy_ar(target, runtime.tokenizer.encode("Once upon a time"), 150)
        assert result["out"] == expected
    finally:
        good.close()
        relay.stop()


def test_the_edge_side_needs_no_ray(tiny_dir):
    """Devices do not run a cluster: the edge client and `distspec edge` import without Ray
    (nor the server's health, reflection and metrics packages)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "for name in ('ray', 'grpc_health', 'grpc_reflection', 'prometheus_client', 'yaml'):\n"
        "    sys.modules[name] = None  # any import of them fails\n"
        "import distspec.edge_client, distspec.bench.relay\n"
        "from distspec.cli import main\n"
        "rc = main(['edge', '--server', '127.0.0.1:1', '--prompt', 'x', '--drafter', 'ngram',\n"
        "           '--target', sys.argv[1]])\n"
        "assert rc == 1, rc  # a connection error, after every import happened\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tiny_dir)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "UNAVAILABLE" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [True, False])
def test_demo_edge_greedy_equals_transformers_through_the_relay(demo_hf, overlap):
    """The demo pair: the server holds SmolLM2-135M, the edge runs the demo drafter, 20 ms
    of emulated round trip between them."""
    import torch

    from test_ray_runtime import hf_greedy

    cluster = ClusterConfig(target=TargetSpec("demo", num_slots=2, max_len=1024), drafter=None)
    runtime = Runtime(RuntimeConfig(cluster, SchedulerConfig(mode="ar"), use_ray=False))
    srv = GrpcServer(runtime, port=0, host="127.0.0.1")
    relay = DelayRelay(f"127.0.0.1:{srv.start()}", delay_s=0.01).start()
    client = EdgeClient(relay.address, new_drafter(load_drafter("demo", "demo")), overlap=overlap)
    try:
        torch.manual_seed(0)
        drafted = 0
        for prompt in ("What is the capital of France?", "List three primary colors."):
            steps = list(
                client.generate(SamplingParams(max_new_tokens=40), messages=[("user", prompt)])
            )
            assert [t for s in steps for t in s.token_ids] == hf_greedy(demo_hf, prompt)
            drafted += steps[-1].stats.draft_tokens
        # over both: with overlap the server may finish a short first answer (8 tokens) on
        # its own before the drafter's first, cold draft arrives
        assert drafted > 0
    finally:
        client.close()
        relay.stop()
        srv.stop(grace_s=1)
        runtime.close()
