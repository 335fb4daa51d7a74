from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from distspec.models.loader import load_model
from tiny import SMALL_V, TINY_MAX_LEN, make_tiny_model_dir

# `make test` runs the suite on every core with pytest-xdist; each worker then gets its share.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))

# Under xdist a module's tests stay on one worker, so its module fixtures (servers, models,
# sampled outcomes) are built once; the modules that start local Ray clusters (or a Ray head)
# share one worker, so two clusters never start at once and compete for a small machine.
RAY_MODULES = {
    "test_chaos",
    "test_drain",
    "test_faults",
    "test_load",
    "test_ray_jobs",
    "test_ray_runtime",
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "ray" if Path(module).stem in RAY_MODULES else module

    return ModuleScheduling(config, log)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (4 heads, 2 KV heads, 2 layers) with a byte tokenizer."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny_drafter_dir(tmp_path_factory) -> Path:
    """Another tiny random Llama with the same tokenizer: a drafter for tiny_dir."""
    return make_tiny_model_dir(
        tmp_path_factory.mktemp("tiny") / "drafter", num_layers=1, hidden_size=32, seed=1
    )


@pytest.fixture(scope="module")
def target(tiny_dir):
    """tiny_dir loaded, 256 positions, one KV slot."""
    return load_model(str(tiny_dir), max_len=TINY_MAX_LEN)


@pytest.fixture(scope="module")
def draft_model(tiny_drafter_dir):
    return load_model(str(tiny_drafter_dir), max_len=TINY_MAX_LEN)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(target, drafter) over an 8-token vocabulary: joint distributions can be enumerated."""
    root = tmp_path_factory.mktemp("small-vocab")
    t = make_tiny_model_dir(root / "target", vocab_size=SMALL_V)
    d = make_tiny_model_dir(
        root / "drafter", vocab_size=SMALL_V, num_layers=1, hidden_size=32, seed=1
    )
    return load_model(str(t), max_len=32), load_model(str(d), max_len=32)


@pytest.fixture(scope="session")
def demo_hf():
    """(transformers model, tokenizer) loaded straight from the demo GGUF by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distspec.models.loader import demo_gguf_path

    gguf = demo_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    return model, tok


@pytest.fixture(scope="session")
def demo_loaded():
    """distspec's own demo model (packed for CPU, as the engine runs it)."""
    from distspec.models.linear import pack_for_cpu
    from distspec.models.loader import load_model

    loaded = load_model("demo", max_len=2048)
    pack_for_cpu(loaded.model)
    return loaded
