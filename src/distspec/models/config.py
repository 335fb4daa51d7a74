"""Model hyper-parameters for the Llama family (Llama 2/3, Qwen2, Mistral, SmolLM)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
SUPPORTED_MODEL_TYPES = tuple(_ARCHITECTURES)


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # Drafters only: score a reduced vocabulary (lm_head.token_ids lists it) and/or take the
    # input embedding from the target instead of storing a copy.
    draft_vocab_size: int | None = None
    embedding_from_target: bool = False

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            supported = ", ".join(SUPPORTED_MODEL_TYPES)
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {supported}")
        n_heads = d["num_attention_heads"]
        rope = d.get("rope_parameters") or {}
        rope_scaling = d.get("rope_scaling") or None
        if rope_scaling is None and rope.get("rope_type", "default") != "default":
            rope_scaling = rope
        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        sliding = d.get("sliding_window") if d.get("use_sliding_window", True) else None
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
            rope_scaling=rope_scaling,
            attention_bias=d.get("attention_bias", model_type == "qwen2"),
            mlp_bias=d.get("mlp_bias", False),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            sliding_window=sliding if model_type == "mistral" else None,
            model_type=model_type,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            draft_vocab_size=d.get("draft_vocab_size"),
            embedding_from_target=d.get("embedding_from_target", False),
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        return cls.from_hf_dict(json.loads(Path(path).read_text()))

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers reads back as the same model."""
        d = asdict(self)
        eos = d.pop("eos_token_ids")
        d["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        d["architectures"] = [_ARCHITECTURES[self.model_type]]
        if d["sliding_window"] is None:
            d.pop("sliding_window")
        for key in ("rope_scaling", "draft_vocab_size"):
            if d[key] is None:
                d.pop(key)
        if not d["embedding_from_target"]:
            d.pop("embedding_from_target")
        return d
