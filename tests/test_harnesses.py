"""The benchmark harnesses run briefly as a user runs them (the CLI, tiny models): each
finishes, and prints no traceback or error among its progress output."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from distspec.cli import main
from distspec.models.cpu_kernels import kernels

FAULT = re.compile(r"Traceback|Error|Exception")


def run_quietly(capfd, caplog, *args: str, logs: tuple[Path, ...] = ()) -> str:
    """main(args) must succeed; stderr (file descriptor 2: tqdm, logging, child processes),
    the log records pytest takes and the given log files must hold no fault. Returns stdout."""
    rc = main(list(args))
    out, err = capfd.readouterr()
    assert rc == 0, err
    text = err + "".join(path.read_text() for path in logs)
    faults = [line for line in text.replace("\r", "\n").splitlines() if FAULT.search(line)]
    assert not faults, "\n".join(faults)
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]
    return out


def test_bench_serve_starting_with_ar(capfd, caplog, tiny_dir, tiny_drafter_dir, tmp_path):
    """ar listed first: the runtime still gets the drafter sd needs."""
    out = run_quietly(
        capfd,
        caplog,
        *("bench-serve", "--target", str(tiny_dir), "--drafter", str(tiny_drafter_dir)),
        *("--modes", "ar,sd", "--clients", "1", "--max-new-tokens", "8", "--no-ray"),
        *("--out", str(tmp_path)),
    )
    report = json.loads((tmp_path / "serving.json").read_text())
    assert list(report["summary"]) == ["ar@1", "sd@1"]
    assert {r["mode"] for r in report["runs"]} == {"ar", "sd"}
    assert report["costs"] is not None  # calibrated against the drafter
    assert "sd@1" in out
    # where a round's time goes: the parts fit in the whole, the forward in the target call
    for level in report["summary"].values():
        ms = level["round_ms"]
        assert 0 < ms["forward"] <= ms["target_call"] <= ms["round"]
        assert ms["scheduler"] >= 0 and ms["draft"] >= 0
    assert report["summary"]["ar@1"]["round_ms"]["draft"] == 0


def test_bench_edge_through_the_relay(capfd, caplog, tiny_dir, tiny_drafter_dir, tmp_path):
    """Each RTT's relay is torn down with connections still open: it must end quietly."""
    out = run_quietly(
        capfd,
        caplog,
        *("bench-edge", "--target", str(tiny_dir), "--drafter", str(tiny_drafter_dir)),
        *("--rtts", "0,20", "--num-prompts", "1", "--max-new-tokens", "8"),
        *("--out", str(tmp_path)),
    )
    summary = json.loads((tmp_path / "edge.json").read_text())["summary"]
    assert set(summary) == {
        f"{c}@{r}" for c in ("edge-overlap", "edge-stop-wait", "server-ar") for r in (0, 20)
    }
    assert "edge-overlap@20" in out


def test_bench_load_one_level(capfd, caplog, tiny_dir, tiny_drafter_dir, tmp_path):
    out = run_quietly(
        capfd,
        caplog,
        *("bench-load", "--target", str(tiny_dir), "--drafter", str(tiny_drafter_dir)),
        *("--clients", "2", "--duration-s", "2", "--max-new-tokens", "8", "--max-len", "512"),
        *("--num-slots", "2", "--no-ray", "--out", str(tmp_path)),
        logs=(tmp_path / "serve.log",),  # the started server's stderr
    )
    (level,) = json.loads((tmp_path / "load.json").read_text())["levels"]
    assert level["clients"] == 2 and level["completed"] > 0
    assert "wrote" in out


def test_bench_kernels_on_a_tiny_model(capfd, caplog, tiny_dir, tmp_path):
    kinds = "skinny,onednn,blas,int4,int4-x8" if kernels() is not None else "onednn,blas,int8"
    out = run_quietly(
        capfd,
        caplog,
        *("bench-kernels", "--target", str(tiny_dir), "--rows", "1,5", "--repeats", "2"),
        *("--kernels", kinds, "--steps", "fp32,int4", "--out", str(tmp_path)),
    )
    report = json.loads((tmp_path / "kernels.json").read_text())
    steps = {(r["dtype"], r["rows"]): r for r in report["steps"]}
    assert set(steps) == {(d, n) for d in ("fp32", "int4") for n in (1, 5)}
    assert all(r["step_ms"] > 0 for r in steps.values())
    assert steps["fp32", 1]["cost_vs_fewest_rows"] == 1.0
    assert "| target weights | rows | step ms |" in out
    assert {(r["kernel"], r["rows"]) for r in report["results"]} == {
        (k, n) for k in kinds.split(",") for n in (1, 5)
    }
    assert all(r["gb_per_s"] > 0 for r in report["results"])
    assert report["read_bandwidth_gbs"] > 0 and (tmp_path / "kernels.png").stat().st_size > 0
    assert "| kernel | MB | rows |" in out
    mb = {r["kernel"]: r["weight_mb"] for r in report["results"]}
    assert max(v for k, v in mb.items() if k.startswith("int")) < 0.4 * mb["onednn"]


def test_gpu_check_runs_its_checks_on_the_cpu(tiny_dir, tmp_path, capsys):
    """make gpu-check's script, run here with --device cpu: every check passes on the tiny
    model and the report lists them (on a GPU machine it runs the same code on CUDA)."""
    from distspec.bench.gpu_check import main

    rc = main(["--device", "cpu", "--target", str(tiny_dir), "--tokens", "12", "--prompts", "2"])
    rc_out = capsys.readouterr().out
    assert rc == 0, rc_out
    for name in (
        "greedy float32 = transformers | ok | 2/2",
        "int4 linear",
        "sd int4 = ar int4",
        "CUDA graph steps = eager steps | ok",
    ):
        assert name in rc_out
    assert "| int4 float32 |" in rc_out
    import torch

    if not torch.cuda.is_available():
        assert main(["--device", "cuda", "--target", str(tiny_dir)]) == 2
