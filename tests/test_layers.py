"""The layering, read from the imports (every `import` and `from ... import` anywhere in a file,
lazy ones inside functions included): each package imports only the ones below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "distspec"
NETWORK = {"grpc", "grpc_health", "grpc_reflection", "starlette", "uvicorn", "fastapi"}
# package -> the packages of distspec it must not import (None: any but its own)
FORBIDDEN: dict[str, set[str] | None] = {
    "models": None,
    "datasets": None,
    "spec_decode": {
        "workers",
        "cluster",
        "scheduler",
        "server",
        "edge_client",
        "engine",
        "llm",
        "cli",
        "bench",
        "train",
        "datasets",
    },  # fmt: skip
    "workers": {"engine", "llm", "scheduler", "server", "cluster", "cli", "bench", "train"},
    "cluster": {"engine", "llm", "scheduler", "server", "cli", "bench", "train"},
    "scheduler": {"server", "cli", "bench", "train", "engine", "llm"},
    "server": {"cli", "bench", "train", "engine", "llm"},
    "edge_client": {
        "cluster",
        "scheduler",
        "server",
        "workers",
        "engine",
        "llm",
        "cli",
        "bench",
        "train",
    },  # fmt: skip
    "engine": {"scheduler", "server", "cluster", "cli", "bench", "train"},
}
FORBIDDEN_LIBS = {"spec_decode": {"ray"} | NETWORK, "scheduler": NETWORK, "edge_client": {"ray"}}
TOP = {"bench", "train"}  # the harnesses and training: only the CLI stands on them


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _package(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _files() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "v1" not in p.relative_to(SRC).parts)


def breaks() -> list[str]:
    found = []
    for path in _files():
        pkg = _package(path)
        mods = _imports(path)
        ours = {m.split(".")[1] for m in mods if m.startswith("distspec.") and m.count(".") >= 1}
        libs = {m.split(".")[0] for m in mods}
        rel = path.relative_to(SRC.parent)
        rule = FORBIDDEN.get(pkg, set())
        bad = ours - {pkg, "v1"} if rule is None else ours & rule
        if bad:
            found.append(f"{rel}: {pkg} imports {sorted(bad)}")
        if libs & FORBIDDEN_LIBS.get(pkg, set()):
            found.append(f"{rel}: {pkg} imports {sorted(libs & FORBIDDEN_LIBS[pkg])}")
        if pkg not in TOP | {"cli"} and ours & TOP:
            found.append(f"{rel}: {pkg} imports {sorted(ours & TOP)} (only the CLI may)")
    return found


def test_each_package_imports_only_what_lies_below_it():
    assert breaks() == []


def test_the_rules_see_a_break(tmp_path, monkeypatch):
    """The check itself can fail: a worker that reaches up into the server is caught."""
    fake = tmp_path / "distspec"
    (fake / "workers").mkdir(parents=True)
    (fake / "workers" / "w.py").write_text(
        "def f():\n    from distspec.server.gateway import Gateway\n    import grpc\n"
    )
    (fake / "scheduler").mkdir()
    (fake / "scheduler" / "s.py").write_text("import grpc\nfrom distspec.bench import load\n")
    monkeypatch.setattr(__import__(__name__), "SRC", fake)
    found = breaks()
    assert any("workers imports ['server']" in b for b in found), found
    assert any("scheduler imports ['grpc']" in b for b in found), found
    assert any("only the CLI may" in b for b in found), found


@pytest.mark.parametrize("package", sorted(FORBIDDEN) + ["cli", "bench", "train"])
def test_every_package_says_what_it_holds(package):
    init = SRC / package / "__init__.py"
    path = init if init.exists() else SRC / f"{package}.py"
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and len(doc) > 40, f"{path} has no docstring saying what lives there"
