"""distspec's own CPU kernels (C++ in kernels/), compiled once per machine and cached.

`make setup` builds them (`python -m distspec.models.cpu_kernels`) into
~/.cache/distspec/kernels/<hash of sources, flags and torch>/; later processes import the
cached library directly (no build step, no lock a killed process could leave behind). Without
a compiler, on a CPU without AVX2/FMA, or with DISTSPEC_CPU_KERNELS=0, `kernels()` is None and
the models use PyTorch's kernels instead.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

NAME = "distspec_cpu_kernels"
SOURCES = [
    Path(__file__).with_name("kernels") / name
    for name in (
        "skinny_linear.cpp",
        "quant_linear.cpp",
        "decode_ops.cpp",
        "decoder_layer.cpp",
        "bindings.cpp",
    )
]
HEADERS = [
    Path(__file__).with_name("kernels") / name for name in ("vec.h", "ops.h", "decoder_layer.h")
]
# OpenMP: torch's own runtime, for parallel_for. No FMA contraction of scalar code: rope's
# products and sums then round exactly as PyTorch's (the vector code asks for FMA itself).
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp"]


def cpu_flags() -> set[str]:
    """This CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def build_flags() -> list[str]:
    """FLAGS and this CPU's isa_flags: what the kernels are compiled with."""
    return FLAGS + isa_flags()


def isa_flags() -> list[str]:
    """AVX-512 (and its integer dot products) where this CPU has them: the kernels use them
    under #ifdef, with the same bits as their AVX2 code. Named, not -march=native, so the
    cache key tells builds for different CPUs apart."""
    have = cpu_flags()
    if not {"avx512f", "avx512vl", "avx512dq", "avx512bw"} <= have:
        return []
    return ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx512bw"] + (
        ["-mavx512vnni"] if "avx512_vnni" in have else []
    )


def supported() -> bool:
    """This CPU runs the kernels (x86-64 with AVX2, FMA and F16C) and they are not switched off."""
    if os.environ.get("DISTSPEC_CPU_KERNELS", "1") == "0":
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def library_path() -> Path:
    """Where this build of the kernels lives: keyed by their sources, flags and torch."""
    h = hashlib.sha256()
    for source in [*SOURCES, *HEADERS]:
        h.update(source.read_bytes())
    h.update(" ".join(build_flags()).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distspec" / "kernels"
    return root / h.hexdigest()[:16] / f"{NAME}.so"


def _build(path: Path) -> ModuleType:
    """Compile in a private directory, then publish the library with an atomic rename:
    readers only ever see a complete file (two processes building at once both succeed)."""
    from torch.utils.cpp_extension import load

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as build_dir:
        module = load(
            name=NAME,
            sources=[str(s) for s in SOURCES],
            extra_cflags=build_flags(),
            extra_ldflags=["-fopenmp"],
            build_directory=build_dir,
            verbose=False,
        )
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(module.__file__, tmp)
        os.replace(tmp, path)
    return module


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def kernels() -> ModuleType | None:
    """The compiled kernels (built on first use if `make setup` did not), or None."""
    if not supported():
        return None
    try:
        path = library_path()
        return _import(path) if path.exists() else _build(path)
    except Exception as e:  # no compiler, no headers: PyTorch's kernels still work
        log.warning("distspec's CPU kernels are unavailable (%s); using PyTorch's", e)
        return None


def main() -> int:
    ok = kernels() is not None
    where = f"built: {library_path()}" if ok else "not available (PyTorch kernels in use)"
    print("distspec CPU kernels", where)
    return 0  # a machine without them still runs, on PyTorch's kernels


if __name__ == "__main__":
    sys.exit(main())
