"""`distspec bench-load` on tiny models: admission control under more clients than the
server holds, the report (table, JSON, PNG), RSS of every server process; on Ray (slow): no
memory growth over a run, every process of the cluster measured."""

from __future__ import annotations

import json
import os

import pytest

from distspec.bench.load import LoadReport, format_table, run_load_bench
from distspec.bench.load_config import LoadConfig
from distspec.bench.procmem import ProcessTreeSampler, RssSample
from distspec.cli import main
from test_cli import assert_one_line_error

SLOTS, WAITING = 2, 1
CLIENTS = 8  # > SLOTS + WAITING: admission must refuse some


def tiny_config(tiny_dir, tiny_drafter_dir, out, **kw) -> LoadConfig:
    # 512 positions: the longest benchmark prompt is 413 bytes in the tiny byte tokenizer
    settings = dict(target=str(tiny_dir), drafter=str(tiny_drafter_dir), num_slots=SLOTS)
    settings |= dict(max_waiting=WAITING, max_len=512, max_new_tokens=16, out_dir=str(out))
    return LoadConfig(**(settings | kw))


def assert_admission_bounded(report: LoadReport, level) -> None:
    assert level.rejections > 0 and level.rejection_rate > 0
    assert set(level.errors) == set(), level.errors  # nothing but RESOURCE_EXHAUSTED
    assert level.queue_depth_max is not None
    assert level.queued_beyond_slots_max <= WAITING
    assert level.queue_depth_max <= WAITING + SLOTS
    assert level.active_max <= SLOTS
    assert report.admission_bounded is True


def test_clients_beyond_capacity_are_rejected_not_queued(tiny_dir, tiny_drafter_dir, tmp_path):
    """The default path: the bench starts `distspec serve --no-ray` itself, runs two levels."""
    config = tiny_config(
        tiny_dir, tiny_drafter_dir, tmp_path, clients=[1, CLIENTS], duration_s=3.0, use_ray=False
    )
    config.rss_interval_s = 0.25  # enough samples for the growth figure in 3 s
    report = run_load_bench(config)
    one, many = report.levels
    assert one.clients == 1 and one.rejections == 0 and one.completed > 0
    assert many.clients == CLIENTS and many.tokens > 0 and many.tokens_per_s > 0
    assert many.completed > 0 and many.attempts == many.completed + many.rejections
    assert_admission_bounded(report, many)
    assert many.ttft_p50_s <= many.ttft_p99_s and many.itl_p50_ms <= many.itl_p99_ms
    # RSS: the serve process (its only process without Ray), sampled throughout
    pids = {p.pid for p in report.processes}
    assert report.server["pid"] in pids and report.server["started"]
    assert all(p.samples >= 5 and p.end_mb > 10 for p in report.processes)
    assert many.rss_start_mb > 10 and many.rss_growth is not None and report.leak is False
    data = json.loads((tmp_path / "load.json").read_text())
    assert [lv["clients"] for lv in data["levels"]] == [1, CLIENTS]
    assert data["levels"][1]["rejections"] == many.rejections
    assert (tmp_path / "load.png").stat().st_size > 10_000
    table = format_table(report)
    assert "distspec serve" in table and "no leak" in table and ": bounded" in table


def test_against_a_running_server(tiny_dir, tiny_drafter_dir, tmp_path):
    """--server with --metrics and --server-pid: an in-process server, this process measured."""
    from prometheus_client import start_http_server

    from distspec.bench.serve_process import free_port
    from distspec.server.grpc_server import GrpcServer
    from distspec.server.serve import ServeConfig

    serve = ServeConfig(
        use_ray=False,
        target=str(tiny_dir),
        drafter=str(tiny_drafter_dir),
        mode="sd",
        num_slots=SLOTS,
        max_waiting=WAITING,
        max_len=512,
    )
    from distspec.scheduler.runtime import Runtime

    runtime = Runtime(serve.runtime_config())
    server = GrpcServer(runtime, 0, "127.0.0.1")
    port = server.start()
    metrics_port = free_port()
    httpd, _ = start_http_server(
        metrics_port, addr="127.0.0.1", registry=runtime.scheduler.metrics.registry
    )
    try:
        config = tiny_config(
            tiny_dir,
            tiny_drafter_dir,
            tmp_path,
            clients=[CLIENTS],
            duration_s=2.0,
            server=f"127.0.0.1:{port}",
            metrics=f"127.0.0.1:{metrics_port}",
            server_pid=os.getpid(),
        )
        report = run_load_bench(config)
    finally:
        httpd.shutdown()
        server.stop(1)
        runtime.close()
    (level,) = report.levels
    assert level.tokens > 0
    assert_admission_bounded(report, level)
    assert os.getpid() in {p.pid for p in report.processes}
    assert not report.server["started"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--clients", "0"], "--clients"),
        (["--clients", "4,x"], "--clients"),
        (["--duration-s", "0"], "duration_s must be > 0"),
        (["--server", "nohost"], "server must be HOST:PORT"),
        (["--metrics", "127.0.0.1:9090"], "go with server"),
        (["--warmup-s", "70"], "warmup_s"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
    ],
)
def test_bad_flags_are_one_line_errors(capsys, tmp_path, args, fragment):
    try:
        rc = main(["bench-load", "--out", str(tmp_path), *args])
    except SystemExit as e:  # argparse's own errors (one line too, see cli._Parser)
        rc = e.code
    assert fragment in assert_one_line_error(rc, capsys.readouterr().err)
    assert not (tmp_path / "load.json").exists()


def test_no_server_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    from distspec.bench import load
    from distspec.bench.serve_process import free_port

    monkeypatch.setattr(load, "READY_TIMEOUT_S", 0.5)
    rc = main(["bench-load", "--server", f"127.0.0.1:{free_port()}", "--out", str(tmp_path)])
    assert "no server answers" in assert_one_line_error(rc, capsys.readouterr().err)


def test_growth_is_last_third_median_minus_first_third():
    sampler = ProcessTreeSampler(os.getpid())
    totals = [100, 101, 99, 100, 130, 100, 160, 161, 159]  # MB; one spike in the middle
    sampler.samples = [RssSample(float(t), {1: int(v * 1e6)}) for t, v in enumerate(totals)]
    growth = sampler.growth(0, 8)
    assert growth.baseline_mb == pytest.approx(100) and growth.growth_mb == pytest.approx(60)
    assert sampler.growth(0, 1) is None  # too few samples


@pytest.mark.slow
def test_ray_server_memory_is_flat_and_every_process_is_measured(
    tiny_dir, tiny_drafter_dir, tmp_path, monkeypatch
):
    """`distspec serve` on a local Ray cluster: the serve process, GCS, raylet and the worker
    actors are all sampled, and none of them grows past the leak limit at constant load."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # GCS keeps the last task events of every actor call (Ray's default: 100k of them, some
    # 100 MB) by design; at the tiny models' thousands of calls per second that buffer
    # fills for a few minutes and reads as growth. A small cap leaves any other growth.
    monkeypatch.setenv("RAY_task_events_max_num_task_in_gcs", "1000")
    config = tiny_config(
        tiny_dir, tiny_drafter_dir, tmp_path, clients=[CLIENTS], duration_s=40.0, warmup_s=8.0
    )
    report = run_load_bench(config)
    print(format_table(report))
    (level,) = report.levels
    assert level.tokens > 0 and not level.errors
    assert_admission_bounded(report, level)
    labels = {p.label for p in report.processes}
    assert len(report.processes) > 1
    assert {"distspec serve", "gcs_server", "raylet"} <= labels, labels
    assert {"ray::TargetWorker", "ray::DrafterWorker"} <= labels, labels
    assert level.rss_growth is not None and level.rss_growth.samples >= 25
    assert level.rss_growth.growth_mb < config.leak_limit_mb, format_table(report)
    assert report.leak is False
