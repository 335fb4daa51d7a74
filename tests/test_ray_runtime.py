"""The distributed runtime on a real local Ray cluster (CPU): a TP=2 target (two gloo ranks)
and a drafter actor behind `distspec serve`, driven over gRPC; PEARL's sampling checked
statistically through the same runtime."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter

import grpc
import pytest
import torch

from distspec.cluster.ray_cluster import ClusterConfig
from distspec.scheduler.runtime import Runtime, RuntimeConfig
from distspec.scheduler.scheduler import SchedulerConfig
from distspec.spec_decode.sampling import SamplingParams
from distspec.v1 import speculative_decoding_pb2 as pb
from distspec.v1 import speculative_decoding_pb2_grpc as pb_grpc
from distspec.workers.drafter import DrafterSpec
from distspec.workers.target import TargetSpec
from test_decoding import ALPHA, SMALL_PROMPT, exact_joint, gof_pvalue, marginal
from test_tensor_parallel import free_port

pytestmark = pytest.mark.slow

PROMPTS = [
    "Rewrite in the past tense: I walk to the store and buy milk.",
    "List three primary colors.",
    "What is the capital of France?",
    "Write a Python function that adds two numbers.",
]
NEW_TOKENS = 40
START_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`distspec serve` with Ray: demo target on 2 tensor-parallel ranks + the demo drafter."""
    metrics_port = free_port()
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+")  # noqa: SIM115
    args = [sys.executable, "-m", "distspec", "serve", "--port", "0", "--target-tp", "2"]
    args += ["--num-slots", "8", "--max-len", "1024", "--metrics-port", str(metrics_port)]
    args += ["--decode-steps", "1"]  # plain rounds as short as sd ones: the tests see drafts
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    line = _read_line(proc, START_TIMEOUT_S)
    match = re.search(r"serving .* on .*:(\d+)$", line.strip())
    if not match:
        proc.kill()
        log.seek(0)
        pytest.fail(f"serve did not start: {line!r}\n{log.read()[-3000:]}")
    channel = grpc.insecure_channel(f"127.0.0.1:{match.group(1)}")
    yield proc, channel, metrics_port
    channel.close()
    if proc.poll() is None:
        proc.kill()
    log.close()


def _read_line(proc, timeout_s: float) -> str:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return box[0] if box else ""


def generate(channel, prompt: str, **fields) -> tuple[list[int], pb.GenerateResponse]:
    stub = pb_grpc.SpeculativeDecodingStub(channel)
    request = pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content=prompt)], max_new_tokens=NEW_TOKENS, **fields
    )
    responses = list(stub.Generate(request, timeout=300))
    return [t for r in responses for t in r.token_ids], responses[-1]


def hf_greedy(demo_hf, prompt: str) -> list[int]:
    model, tok = demo_hf
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not exported"
    return float(match.group(1))


def test_greedy_generate_equals_transformers(served, demo_hf):
    _, channel, _ = served
    for prompt in PROMPTS[:2]:
        ids, last = generate(channel, prompt)
        assert ids == hf_greedy(demo_hf, prompt), prompt
        assert last.stats.draft_tokens > 0  # the drafter actor did draft


def test_concurrent_sessions_equal_their_single_session_results(served):
    _, channel, metrics_port = served
    requests = [(p, {}) for p in PROMPTS] + [(p, {"temperature": 0.7, "seed": 11}) for p in PROMPTS]
    alone = [generate(channel, p, **kw)[0] for p, kw in requests]
    together: list = [None] * len(requests)

    def run(i: int) -> None:
        together[i] = generate(channel, requests[i][0], **requests[i][1])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert together == alone
    assert metric(metrics_port, "vllm:spec_decode_num_draft_tokens_total") > 0


def test_cancelled_stream_frees_its_session(served):
    _, channel, metrics_port = served
    stub = pb_grpc.SpeculativeDecodingStub(channel)
    essay = pb.ChatMessage(role="user", content="Write a long essay on the history of Rome.")
    stream = stub.Generate(pb.GenerateRequest(messages=[essay], max_new_tokens=900), timeout=300)
    assert next(stream).finish_reason == pb.FINISH_REASON_UNSPECIFIED
    assert metric(metrics_port, "distspec:active_sessions") == 1
    stream.cancel()
    deadline = time.monotonic() + 30
    while metric(metrics_port, "distspec:active_sessions") != 0:
        assert time.monotonic() < deadline, "the cancelled session kept its KV slot"
        time.sleep(0.05)


def test_sigterm_shuts_down_cleanly(served):
    proc, _, _ = served
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0


# ---------------------------------------------------------------------------------------------
# PEARL sampling through the distributed runtime: tiny models over an 8-token vocabulary


SAMPLES = 2000
WAVE = 64  # sessions batched per round: fewer rounds, fewer Ray calls


def test_pearl_sampling_on_ray_matches_the_target_distribution(small):
    t, d = small[0].path, small[1].path
    cluster = ClusterConfig(
        target=TargetSpec(str(t), num_slots=WAVE, max_len=64),
        target_tp=2,
        drafter=DrafterSpec(str(d), str(t), num_slots=WAVE, max_len=64, lookup=False),
    )
    runtime = Runtime(RuntimeConfig(cluster, SchedulerConfig(mode="pearl", gamma=3)))
    try:
        params = SamplingParams(max_new_tokens=4, temperature=1.0)
        counts: Counter = Counter()
        for wave in range(0, SAMPLES, WAVE):
            sessions = [
                runtime.scheduler.submit(
                    SMALL_PROMPT, SamplingParams(max_new_tokens=4, temperature=1.0, seed=seed)
                )
                for seed in range(wave, wave + WAVE)
            ]
            for s in sessions:
                out = [tok for step in s.stream(timeout_s=120) for tok in step.token_ids]
                counts[tuple(out[:3])] += 1
        c = runtime.scheduler.counters
        assert 0.1 * c["draft_tokens"] < c["accepted_tokens"] < 0.9 * c["draft_tokens"]
    finally:
        runtime.close()
    exact = exact_joint(small[0].model, SMALL_PROMPT, params)
    pvalues = [gof_pvalue(counts, exact)]
    pvalues += [gof_pvalue(marginal(counts, i), marginal(exact, i)) for i in range(3)]
    print(f"pearl on ray: p = {', '.join(f'{p:.3g}' for p in pvalues)}")
    assert min(pvalues) > ALPHA


def test_layer_parallel_drafter_actors_are_lossless(tiny_dir, tmp_path):
    """EasySpec on Ray: a drafter group of 2 actors, each group's attentions split over
    them, in SD and PEARL rounds; greedy output is the target's own."""
    from distspec.models.loader import load_model
    from test_decoding import greedy_ar
    from tiny import make_tiny_model_dir

    deep = make_tiny_model_dir(tmp_path / "deep", num_layers=6, seed=3)
    cluster = ClusterConfig(
        target=TargetSpec(str(tiny_dir), num_slots=4, max_len=128),
        drafter=DrafterSpec(
            str(deep), str(tiny_dir), max_len=128, lookup=False,
            parallel="layer", easyspec_group=2,
        ),
        drafter_tp=2,
    )  # fmt: skip
    target = load_model(str(tiny_dir), max_len=128)
    prompts = [target.tokenizer.encode(p) for p in ("Hello", "abcabcabc", "Once upon a")]
    runtime = Runtime(RuntimeConfig(cluster, SchedulerConfig(mode="sd", gamma=4, decode_steps=1)))
    try:
        for mode in ("sd", "pearl"):
            runtime.scheduler.set_mode(mode)
            sessions = [
                runtime.scheduler.submit(ids, SamplingParams(max_new_tokens=24)) for ids in prompts
            ]
            for ids, s in zip(prompts, sessions, strict=True):
                out = [tok for step in s.stream(timeout_s=120) for tok in step.token_ids]
                expected = greedy_ar(target, ids, 24)
                assert out == expected[: len(out)] and len(out) >= 1, mode
                assert len(out) == 24 or out[-1] in target.tokenizer.eos_token_ids
        assert runtime.scheduler.counters["draft_tokens"] > 0
    finally:
        runtime.close()


def test_target_and_drafter_actors_compute_on_cores_of_their_own(tiny_dir, tiny_drafter_dir):
    """On one machine the drafter actor takes its core and the target every other one; each
    actor is pinned there with as many torch threads (read back from the actors)."""
    from distspec.models.loader import load_model
    from test_decoding import greedy_ar

    cores = sorted(os.sched_getaffinity(0))
    cluster = ClusterConfig(
        target=TargetSpec(str(tiny_dir), num_slots=2, max_len=128),
        drafter=DrafterSpec(str(tiny_drafter_dir), str(tiny_dir), max_len=128, lookup=False),
    )
    runtime = Runtime(RuntimeConfig(cluster, SchedulerConfig(mode="pearl", gamma=3)))
    try:
        target_cores, drafter_cores = tuple(cores[:-1]), (cores[-1],)
        if len(cores) < 2:  # one core: shared by both, unpinned
            target_cores = drafter_cores = tuple(cores)
        assert runtime.target("placement") == (target_cores, len(target_cores))
        assert runtime.drafters[0]("placement") == (drafter_cores, 1)
        assert f"target: 1 rank(s) x {len(target_cores)} CPU" in runtime.placement()
        target = load_model(str(tiny_dir), max_len=128)
        ids = target.tokenizer.encode("abcabcabc")
        session = runtime.scheduler.submit(ids, SamplingParams(max_new_tokens=24))
        out = [tok for step in session.stream(timeout_s=120) for tok in step.token_ids]
        assert out == greedy_ar(target, ids, 24)[: len(out)] and out
    finally:
        runtime.close()
