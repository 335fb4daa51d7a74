"""`distspec bench-chaos` on tiny models (slow: a real local Ray cluster, TP=2): one fault of
each kind under 4 streaming clients (one of them an edge client behind a relay); nothing is
lost, every completed answer is the greedy reference, every fault recovers and the report is
written. Fast: bad settings are one-line CLI errors before anything starts."""

from __future__ import annotations

import json
import time

import pytest

from distspec.bench.chaos_config import FAULT_KINDS, ChaosConfig
from distspec.cli import main
from test_cli import assert_one_line_error

# the slow ones first, while there is most time left: a fault waits for the one before it
FAULTS = ["kill-drafter", "kill-target-rank", "stall-reader", "hostile-chunks", "drop-edge"]


@pytest.mark.slow
def test_one_fault_of_each_kind_under_load(tiny_dir, tiny_drafter_dir, tmp_path):
    from distspec.bench.chaos import format_table, run_chaos_bench

    # 512 positions: the longest benchmark prompt is 413 bytes in the tiny byte tokenizer
    config = ChaosConfig(
        clients=4,
        edge_clients=1,
        duration_s=44.0,
        fault_interval_s=8.0,  # at 8, 16, 24, 32, 40 s, or once the one before recovered
        faults=FAULTS,
        settle_s=1.5,
        max_new_tokens=24,
        target=str(tiny_dir),
        drafter=str(tiny_drafter_dir),
        num_slots=8,
        max_waiting=8,
        max_len=512,
        stall_timeout_s=2.0,
        edge_rtt_ms=4.0,
        request_timeout_s=60.0,
        out_dir=str(tmp_path),
    )
    t = time.monotonic()
    report = run_chaos_bench(config)
    table = format_table(report)
    print(table)
    print(f"bench-chaos on tiny models: {time.monotonic() - t:.0f} s in all")
    totals = report.totals
    assert totals["lost"] == 0 and totals["wrong"] == 0, table
    assert totals["completed"] > 20 and totals["edge_requests"] > 0, table
    assert [f.kind for f in report.faults] == FAULTS
    for fault in report.faults:
        assert fault.t_s is not None and fault.recovered, table
        assert fault.tokens_again_s is not None and fault.window.lost == 0, table
    by_kind = {f.kind: f for f in report.faults}
    assert by_kind["kill-target-rank"].repaired_s is not None
    assert by_kind["kill-drafter"].drafter_back_s is not None
    assert by_kind["stall-reader"].bad_actor.got == ["DEADLINE_EXCEEDED"]
    assert by_kind["hostile-chunks"].bad_actor.got == ["INVALID_ARGUMENT"] * 3
    if by_kind["drop-edge"].edge_open:  # an edge stream was cut: it resumed
        assert totals["edge_reconnects"] >= 1, table
    assert report.ok and "verdict: ok" in table
    data = json.loads((tmp_path / "chaos.json").read_text())
    assert [f["kind"] for f in data["faults"]] == FAULTS
    assert data["totals"]["lost"] == 0 and data["baseline"]["completed"] > 0
    assert (tmp_path / "chaos.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--faults", "kill-target-rank,unplug-the-rack"], "unknown fault kind 'unplug-the-rack'"),
        (["--faults", ","], "faults: name at least one"),
        (["--faults", "kill-target-rank", "--target-tp", "1"], "needs target_tp >= 2"),
        (["--faults", "drop-edge", "--edge-clients", "0"], "drop-edge needs edge_clients"),
        (["--clients", "2", "--edge-clients", "3"], "edge_clients must be in [0, clients]"),
        (["--clients", "0"], "clients must be >= 1"),
        (["--duration-s", "30", "--fault-interval-s", "40"], "no fault fits"),
        (["--fault-interval-s", "0"], "fault_interval_s must be > 0"),
        (["--max-slip-s", "-1"], "max_slip_s must be >= 0"),
        (["--drafter", "none"], "drafter must be a model"),
        (["--mode", "ar"], "invalid choice"),
    ],
)
def test_bad_settings_are_one_line_errors(capsys, tmp_path, args, fragment):
    try:
        rc = main(["bench-chaos", "--out", str(tmp_path), *args])
    except SystemExit as e:  # argparse's own errors (one line too, see cli._Parser)
        rc = e.code
    assert fragment in assert_one_line_error(rc, capsys.readouterr().err)
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


def test_the_default_schedule_is_the_long_run():
    """The defaults are the full run: 8 clients (2 edge) for 300 s, 7 faults of 5 kinds."""
    config = ChaosConfig()
    schedule = config.schedule()
    assert config.clients == 8 and config.edge_clients == 2 and config.duration_s == 300
    assert [t for t, _ in schedule] == [40, 80, 120, 160, 200, 240, 280]
    assert {k for _, k in schedule} == set(config.faults) and len(config.faults) == 5
    assert set(config.faults) <= set(FAULT_KINDS)
    short = ChaosConfig(duration_s=60, fault_interval_s=10)
    assert [k for _, k in short.schedule()] == config.faults  # one of each


def test_a_waiting_fault_moves_the_schedule_and_the_end_up_to_max_slip():
    from distspec.bench.chaos import _Harness

    h = _Harness.__new__(_Harness)  # the bookkeeping only: no runtime, no clients
    h.config, h.slip_s, h.deadline = ChaosConfig(max_slip_s=50.0), 0.0, 100.0
    h._slip(30.0)
    assert (h.slip_s, h.deadline) == (30.0, 130.0)
    h._slip(30.0)  # capped: 50 s in all
    assert (h.slip_s, h.deadline) == (50.0, 150.0)
    h._slip(5.0)
    assert (h.slip_s, h.deadline) == (50.0, 150.0)
