"""The llama.cpp contender's runner (bench/llama_cpp.py) against a stand-in tool: a script that
prints llama-completion's timing lines, and dies by SIGSEGV unless one of its options avoids
the crash (as this llama.cpp build's AMX batch path does on some VMs)."""

import logging
import stat

import pytest

from distspec.bench import llama_cpp

FAKE = """#!/bin/sh
echo "$@" >> "{calls}"
case " $* " in
  *" {cure} "*) ;;
  *) {crash} ;;
esac
printf 'three tips\\n\\n'
echo "prompt eval time =      20.00 ms /     4 tokens" >&2
echo "       eval time =     600.00 ms /    63 runs" >&2
"""


def fake_tool(tmp_path, monkeypatch, crash: str, cure: str = "-ub 1"):
    calls = tmp_path / "calls"
    script = tmp_path / "llama-completion"
    script.write_text(FAKE.format(calls=calls, crash=crash, cure=cure))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(llama_cpp, "tool", lambda name: script)
    return calls


@pytest.mark.parametrize("cure, tries", [("-ub 1", 2), ("--no-repack", 3)])
def test_a_crashed_run_is_run_again_with_the_next_fallback(
    tmp_path, monkeypatch, caplog, cure, tries
):
    """First one-token micro-batches (the repacked weights kept), then no repacking."""
    calls = fake_tool(tmp_path, monkeypatch, crash='kill -SEGV "$$"', cure=cure)
    runner = llama_cpp.LlamaCpp(tmp_path / "m.gguf", threads=2)
    with caplog.at_level(logging.WARNING):
        first = runner.run("hi", 64)
    assert (first.text, first.num_tokens, first.wall_s) == ("three tips", 64, pytest.approx(0.62))
    assert "died by signal 11" in caplog.text and " ".join(runner.options) == cure
    runner.run("hi again", 64)  # later prompts go straight to the option that ran
    lines = calls.read_text().splitlines()
    assert [cure in line for line in lines] == [False] * (tries - 1) + [True, True]


def test_a_failing_run_is_an_error_not_a_retry(tmp_path, monkeypatch):
    calls = fake_tool(tmp_path, monkeypatch, crash='echo "bad model" >&2; exit 1')
    runner = llama_cpp.LlamaCpp(tmp_path / "m.gguf", threads=2)
    with pytest.raises(RuntimeError, match="llama-completion failed: bad model"):
        runner.run("hi", 64)
    assert runner.options == () and len(calls.read_text().splitlines()) == 1
