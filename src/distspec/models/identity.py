"""Which model a process holds, in a few bytes. An edge device drafting with a copy of the
server's target (--drafter self) sends it when it opens a session, and the server refuses a
copy of another model: its drafts would still be verified exactly, but accepted rarely.

The vocabulary is hashed whole; the weights are fingerprinted by content (a GGUF file as its
conversion cache keys it, a model directory's config and safetensors alike): the same file
anywhere gives the same fingerprint, another model, quantization or fine-tune another one."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from distspec.models.loader import gguf_content_key, gguf_source, resolve_model_dir, sampled_digest
from distspec.models.tokenizer import Tokenizer


@dataclass(frozen=True)
class ModelIdentity:
    vocab_size: int
    vocab_sha256: str
    weights: str = ""  # weights_fingerprint; "" where not claimed


def vocab_digest(tokenizer: Tokenizer) -> str:
    vocab = sorted(tokenizer.backend.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def weights_fingerprint(name: str) -> str:
    """The content fingerprint of model `name`'s weights ("demo", a .gguf file, a directory)."""
    gguf = gguf_source(name)
    if gguf is not None:
        return gguf_content_key(gguf)
    model_dir = resolve_model_dir(name)
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(sampled_digest(f).encode())
    return h.hexdigest()[:32]


def model_identity(
    name: str, tokenizer: Tokenizer, vocab_size: int, weights: bool = True
) -> ModelIdentity:
    return ModelIdentity(
        vocab_size, vocab_digest(tokenizer), weights_fingerprint(name) if weights else ""
    )


def mismatch(ours: ModelIdentity, theirs: ModelIdentity) -> str | None:
    """Why a drafter of model `theirs` cannot draft for target `ours`, or None."""
    if (theirs.vocab_size, theirs.vocab_sha256) != (ours.vocab_size, ours.vocab_sha256):
        return (
            f"the drafter's vocabulary ({theirs.vocab_size} tokens) differs from the target's "
            f"({ours.vocab_size} tokens): a drafter must share the target's tokenizer"
        )
    if theirs.weights and theirs.weights != ours.weights:
        return (
            f"the drafter is a copy of another model (weights {theirs.weights}) than the "
            f"server's target ({ours.weights}): load the server's model file on this device"
        )
    return None
