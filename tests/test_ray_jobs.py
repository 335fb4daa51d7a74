"""The README's Ray jobs recipe against a real local head: `ray start --head` with the
dashboard's job server, then `ray job submit --working-dir <repo> -- distspec bench ...`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from test_tensor_parallel import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's: `ray`, and `distspec` for the job
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 300
# The shortest bench that still compares two contenders on the demo model.
BENCH = "distspec bench --contenders ar,sd-ngram --num-prompts 1 --max-new-tokens 16 --repeats 1"
PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--node-manager-port",
    "--object-manager-port",
    "--metrics-export-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
)


@pytest.fixture(scope="module")
def ray_head():
    """A head node of its own (free ports, own temp dir), stopped by signalling its own
    process tree: `ray stop` would stop every Ray instance on the machine."""
    # short: Ray's Unix socket paths under the temp dir must stay below 108 bytes
    temp_dir = tempfile.mkdtemp(prefix="distspec-rayjob-", dir="/tmp")
    ports = {flag: free_port() for flag in PORT_FLAGS}
    args = [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats"]
    args += ["--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir, "--num-cpus", "1"]
    args += ["--object-store-memory", str(100 * 1024**2), "--include-dashboard", "true"]
    args += ["--dashboard-host", "127.0.0.1"]
    for flag, port in ports.items():
        args += [flag, str(port)]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    log_path = Path(temp_dir + ".log")
    with open(log_path, "w") as log:
        head = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        _wait_for_job_server(head, address, log_path)
        yield address, env
    finally:
        _stop_tree(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
        log_path.unlink(missing_ok=True)


def _wait_for_job_server(head: subprocess.Popen, address: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"the job server at {address} did not come up:\n{log_path.read_text()[-3000:]}")


def _stop_tree(head: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` stops the processes it started; whatever of its tree
    is left after that (a stuck worker) is killed."""
    try:
        tree = psutil.Process(head.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    head.terminate()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    _, alive = psutil.wait_procs(tree, timeout=30)
    for p in alive:
        p.kill()


def ray_job(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), "job", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_bench_submitted_as_a_ray_job(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "bench-results"
    job_id = f"distspec-bench-{uuid.uuid4().hex[:8]}"
    # The working dir is uploaded without what Ray, .gitignore and .rayignore leave out.
    left_out = (".venv", ".git", "build", "src/distspec/assets")
    script = " && ".join([*(f"test ! -e {p}" for p in left_out), f"{BENCH} --out {out}"])
    submitted = ray_job(
        env,
        "submit",
        "--address",
        address,
        "--submission-id",
        job_id,
        "--working-dir",
        str(REPO),
        "--",
        "sh",
        "-c",
        script,
        timeout=JOB_TIMEOUT_S,
    )
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]

    with urllib.request.urlopen(f"{address}/api/jobs/{job_id}", timeout=10) as r:
        assert json.load(r)["status"] == "SUCCEEDED"
    logs = ray_job(env, "logs", "--address", address, job_id).stdout
    assert "| ar |" in logs and "| sd-ngram |" in logs, logs[-3000:]

    summary = json.loads((out / "bench.json").read_text())["summary"]
    assert set(summary) == {"ar", "sd-ngram"}
    assert summary["sd-ngram"]["same_output_as_ar"]  # greedy: speculation changes nothing
    assert all(s["tokens_per_s"] > 0 for s in summary.values())


def test_ray_job_stop_drains_the_server_and_frees_the_cluster(ray_head, tmp_path):
    """`ray job stop` on `distspec serve`: Ray sends SIGTERM, the request in flight finishes,
    a new one is refused, the job ends STOPPED with no actor or placement group left."""
    import grpc
    from ray.util.state import list_actors, list_placement_groups

    from distspec.bench.grpc_client import chat_request, generate_stub

    address, env = ray_head
    port = free_port()
    job_id = f"distspec-serve-{uuid.uuid4().hex[:8]}"
    # Ray SIGKILLs a job RAY_JOB_STOP_WAIT_TIME_S (default 3) after its SIGTERM
    runtime_env = json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60"}})
    serve = f"distspec serve --port {port} --drafter none --num-slots 2 --drain-timeout-s 30"
    submitted = ray_job(
        env, "submit", "--address", address, "--submission-id", job_id, "--no-wait",
        "--runtime-env-json", runtime_env, "--working-dir", str(REPO), "--", *serve.split(),
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = generate_stub(channel)
    # long enough to be still in flight when `ray job stop` (a CLI process of its own, seconds
    # to start) reaches the server: 40 tokens could finish first (a flake once decoding got
    # faster); this prompt runs the whole 240 tokens (5.6 s at 43 tokens/s on 2 cores)
    request = chat_request(
        "Write a very long story about a dragon and a knight, at least 500 words.", 240
    )
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:  # until the job's server answers
        try:
            expected = [t for r in stub.Generate(request, timeout=60) for t in r.token_ids]
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline, ray_job(env, "logs", "--address", address, job_id)
            time.sleep(1)
    assert any(a.state == "ALIVE" for a in list_actors(address=address))

    stream = stub.Generate(request, timeout=120)
    output = list(next(stream).token_ids)
    stopped = ray_job(env, "stop", "--address", address, job_id, timeout=120)
    output += [t for r in stream for t in r.token_ids]
    assert output == expected
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    with urllib.request.urlopen(f"{address}/api/jobs/{job_id}", timeout=10) as r:
        assert json.load(r)["status"] == "STOPPED"
    logs = ray_job(env, "logs", "--address", address, job_id).stdout
    assert "distspec: drained: 1 finished" in logs, logs[-3000:]
    deadline = time.monotonic() + 60
    while any(a.state != "DEAD" for a in list_actors(address=address)):
        assert time.monotonic() < deadline, list_actors(address=address)
        time.sleep(1)
    groups = list_placement_groups(address=address)
    assert all(g.state == "REMOVED" for g in groups), groups
