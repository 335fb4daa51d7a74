"""A minimal kustomize, for the tests: the subset k8s/ uses (resources, JSON 6902 patches with
a kind/name target, image tags). `kubectl kustomize` renders the same (a test checks it where
kubectl is installed)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KNOWN_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}


def render(directory: Path) -> list[dict]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - KNOWN_FIELDS
    if unknown:
        raise ValueError(f"{directory}: this renderer does not know {sorted(unknown)}")
    docs: list[dict] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            docs += render(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in spec.get("patches", []):
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        target = patch["target"]
        matches = [
            d
            for d in docs
            if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]
        ]
        if not matches:
            raise ValueError(f"{directory}: patch {patch['path']} matches no resource")
        for doc in matches:
            apply_json_patch(doc, ops)
    for image in spec.get("images", []):
        for doc in docs:
            _retag(doc, image)
    return docs


def apply_json_patch(doc: dict, ops: list[dict]) -> None:
    """RFC 6902 add, replace and remove, in place."""
    for op in ops:
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in op["path"][1:].split("/")
        ]
        node: Any = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        value = copy.deepcopy(op.get("value"))
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if op["op"] == "add":
                node.insert(index, value)
            elif op["op"] == "replace":
                node[index] = value
            elif op["op"] == "remove":
                del node[index]
            else:
                raise ValueError(f"unsupported op {op['op']}")
        elif op["op"] in ("add", "replace"):
            if op["op"] == "replace" and last not in node:
                raise KeyError(f"replace of a missing {op['path']}")
            node[last] = value
        elif op["op"] == "remove":
            del node[last]
        else:
            raise ValueError(f"unsupported op {op['op']}")


def _retag(node: Any, image: dict) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    name, _, tag = c.get("image", "").partition(":")
                    if name == image["name"]:
                        c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
            _retag(value, image)
    elif isinstance(node, list):
        for item in node:
            _retag(item, image)
