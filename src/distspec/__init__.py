"""distspec: distributed speculative decoding.

    from distspec import LLM, SamplingParams, EdgeClient

`LLM` generates offline through the serving scheduler (distspec/llm.py), `SamplingParams`
says how, `EdgeClient` drafts on a device for a remote server (distspec/edge_client/).
Names load on first use, so `import distspec` stays light and an edge device needs no Ray.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["LLM", "EdgeClient", "RequestOutput", "SamplingParams"]

_HOMES = {
    "LLM": "distspec.llm",
    "RequestOutput": "distspec.llm",
    "SamplingParams": "distspec.spec_decode.sampling",
    "EdgeClient": "distspec.edge_client",
}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'distspec' has no attribute {name!r}")
