"""Prompt sets that the harnesses and training share: the benchmark prompts (chat prompts kept
apart from any training prompts) and a repetitive multi-turn workload (conversations whose
later turns edit earlier answers). Data only: imports nothing of distspec."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

# built-in sets by name (a --prompts value that is not a file)
BUILTIN = {"benchmark": "benchmark_prompts.json", "repetitive": "repetitive_conversations.json"}


def load_prompts(path: str | None = None, limit: int | None = None) -> list[str]:
    """The prompts of a JSON file (a list, or {"prompts": [...]}); default: the built-in set."""
    prompts = _read(path or "benchmark")
    prompts = prompts["prompts"] if isinstance(prompts, dict) else prompts
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("the prompt file must hold a non-empty list of non-empty strings")
    return prompts[:limit] if limit else prompts


def load_conversations(path: str | None = None, limit: int | None = None) -> list[list[dict]]:
    """Chats to continue, each a list of {"role", "content"} ending with the user's turn: a
    file of {"conversations": [...]}, or of prompts (each a one-message chat)."""
    data = _read(path or "benchmark")
    if not (isinstance(data, dict) and "conversations" in data):
        return [[{"role": "user", "content": p}] for p in load_prompts(path, limit)]
    convs = data["conversations"]
    ok = bool(convs) and all(
        isinstance(c, list)
        and c
        and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in c)
        and c[-1].get("role") == "user"
        for c in convs
    )
    if not ok:
        raise ValueError(
            "conversations must be non-empty lists of {role, content}, each ending with a user turn"
        )
    return convs[:limit] if limit else convs


def _read(path: str):
    if path in BUILTIN:
        return json.loads(resources.files(__name__).joinpath(BUILTIN[path]).read_text())
    return json.loads(Path(path).read_text())
