"""Prompt sets that the harnesses and training share: the benchmark prompts (chat prompts kept
apart from any training prompts). Data only: imports nothing of distspec."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path


def load_prompts(path: str | None = None, limit: int | None = None) -> list[str]:
    """The prompts of a JSON file (a list, or {"prompts": [...]}); default: the built-in set."""
    if path:
        data = json.loads(Path(path).read_text())
    else:
        data = json.loads(resources.files(__name__).joinpath("benchmark_prompts.json").read_text())
    prompts = data["prompts"] if isinstance(data, dict) else data
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("the prompt file must hold a non-empty list of non-empty strings")
    return prompts[:limit] if limit else prompts
