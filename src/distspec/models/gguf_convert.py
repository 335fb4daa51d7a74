"""Convert a GGUF file (llama architecture) into a Hugging Face-style model directory.

Tensors are dequantized to float32 and renamed; llama.cpp's Q/K row permutation (its rotary
layout) is undone so the weights match Hugging Face's "rotate_half" layout.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from distspec.models.config import ModelConfig
from distspec.models.quantized import GGUF_FORMATS, QuantWeight

log = logging.getLogger(__name__)

# Version of what convert_gguf writes: bump it when the output changes (names, dtype, tokenizer
# files...), so that cached conversions made by older code are not reused.
OUTPUT_VERSION = 1

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"unsupported GGUF architecture {arch!r} (supported: llama, qwen2)")
    a = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    names = {t.name for t in reader.tensors}
    n_heads = a("attention.head_count")
    hidden = a("embedding_length")
    tokens = reader.fields["tokenizer.ggml.tokens"]
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        vocab_size=a("vocab_size") or len(tokens.data),
        hidden_size=hidden,
        intermediate_size=a("feed_forward_length"),
        num_hidden_layers=a("block_count"),
        num_attention_heads=n_heads,
        num_key_value_heads=a("attention.head_count_kv", n_heads),
        head_dim=a("attention.key_length") or hidden // n_heads,
        max_position_embeddings=a("context_length", 4096),
        rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(a("rope.freq_base", 10000.0)),
        attention_bias="blk.0.attn_q.bias" in names,
        tie_word_embeddings="output.weight" not in names,
        model_type="qwen2" if arch == "qwen2" else "llama",
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[] if eos is None else [int(eos)],
    )


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of rotary halves in Q/K rows."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        layer, base, kind = parts[1], parts[2], parts[3]
        return f"model.layers.{layer}.{_LAYER_NAMES[base]}.{kind}" if base in _LAYER_NAMES else None
    if parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    return None


def _hf_rows(w: np.ndarray, gguf_name: str, config: ModelConfig) -> np.ndarray:
    """Rows of a GGUF tensor (values or raw blocks) in Hugging Face's order."""
    if config.model_type == "llama" and gguf_name.startswith("blk."):
        base = gguf_name.split(".")[2]
        if base == "attn_q":
            return _unpermute(w, config.num_attention_heads)
        if base == "attn_k":
            return _unpermute(w, config.num_key_value_heads)
    return w


def gguf_state_dict(reader, config: ModelConfig) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    out: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", leave=False):
        name = _hf_name(t.name)
        if name is None:
            continue
        w = _hf_rows(dequantize(t.data, t.tensor_type).astype(np.float32), t.name, config)
        out[name] = torch.from_numpy(np.ascontiguousarray(w))
    return out


def gguf_quantized_weights(gguf_path: str | Path) -> dict[str, QuantWeight]:
    """The GGUF file's 2-D tensors stored in a block format read natively (Q4_0, Q4_1, Q8_0),
    by Hugging Face name, their blocks untouched (Q/K rows reordered as whole rows). A tied
    output head appears as lm_head.weight too: the embedding's blocks."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    config = gguf_config(reader)
    out: dict[str, QuantWeight] = {}
    for t in reader.tensors:
        name, kind = _hf_name(t.name), int(t.tensor_type)
        if name is None or kind not in GGUF_FORMATS or len(t.shape) != 2:
            continue
        raw = _hf_rows(np.asarray(t.data), t.name, config)
        out[name] = GGUF_FORMATS[kind].from_gguf(raw, kind)
    if config.tie_word_embeddings and "model.embed_tokens.weight" in out:
        out.setdefault("lm_head.weight", out["model.embed_tokens.weight"])
    return out


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write config.json, model.safetensors and tokenizer files for gguf_path into out_dir
    (not atomically: the loader's cache converts into a temporary directory and renames it)."""
    from gguf import GGUFReader

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    log.info("converting %s (once; later loads use the cache)", gguf_path)
    reader = GGUFReader(str(gguf_path))
    config = gguf_config(reader)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(gguf_state_dict(reader, config), str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    _convert_tokenizer(gguf_path, reader, out_dir)
    return out_dir


def _convert_tokenizer(gguf_path: Path, reader, out_dir: Path) -> None:
    # transformers' GGUF tokenizer converter builds the exact fast tokenizer; used once here.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    cfg = {
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
