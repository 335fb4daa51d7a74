"""The demo drafter's shape: a few target layers, the target's embedding, a reduced head.

- Layers are initialised from chosen target layers (then distilled).
- The input embedding is the target's own (frozen, not stored): a drafter checkpoint holds
  only its layers, final norm and output head.
- The output head scores only the draft vocabulary, the most frequent target outputs
  (FR-Spec style), initialised from the target's (tied) embedding rows; the verifier stays
  exact because q is the distribution the drafter really sampled from (zero elsewhere).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from distspec.models.llama import Transformer
from distspec.train.datagen import Sample


def frequency_vocab(samples: list[Sample], size: int, always: list[int]) -> torch.Tensor:
    """The `size` token ids the target emits most often (always-included ids first), sorted."""
    counts: Counter[int] = Counter()
    for s in samples:
        counts.update(s.output_ids)
        counts.update(s.topk_ids[:, :4].flatten().tolist())  # near-misses matter for sampling
    ids = list(dict.fromkeys(always))
    for tok, _ in counts.most_common():
        if len(ids) >= size:
            break
        if tok not in ids:
            ids.append(tok)
    return torch.tensor(sorted(ids[:size]), dtype=torch.long)


def init_drafter(target: Transformer, layers: list[int], draft_vocab: torch.Tensor | None):
    """A trainable drafter from an unpacked target (shares the target's embedding)."""
    cfg = replace(
        target.config,
        num_hidden_layers=len(layers),
        tie_word_embeddings=False,
        embedding_from_target=True,
        draft_vocab_size=None if draft_vocab is None else len(draft_vocab),
    )
    drafter = Transformer(cfg)
    drafter.share_embedding(target.embed)
    drafter.embed.weight.requires_grad_(False)
    with torch.no_grad():
        for mine, j in zip(drafter.layers, layers, strict=True):
            mine.load_state_dict(target.layers[j].state_dict(), strict=False)
        drafter.norm.copy_(target.norm)
        head = target.lm_head.weight
        drafter.lm_head.weight.copy_(head if draft_vocab is None else head[draft_vocab])
        if draft_vocab is not None:
            drafter.head_token_ids.copy_(draft_vocab)
    return drafter


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Weights under Hugging Face names (unfused), without the shared embedding."""
    cfg = model.config
    hd = cfg.head_dim
    out: dict[str, torch.Tensor] = {"model.norm.weight": model.norm, "lm_head.weight": None}
    out["lm_head.weight"] = model.lm_head.weight
    if model.head_token_ids is not None:
        out["lm_head.token_ids"] = model.head_token_ids
    nq, nkv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        q, k, v = layer.attn.wqkv.weight.split([nq, nkv, nkv])
        out |= {
            f"{p}self_attn.q_proj.weight": q,
            f"{p}self_attn.k_proj.weight": k,
            f"{p}self_attn.v_proj.weight": v,
            f"{p}self_attn.o_proj.weight": layer.attn.wo.weight,
        }
        gate, up = layer.mlp.w_gate_up.weight.split(layer.mlp.inter)
        out |= {
            f"{p}mlp.gate_proj.weight": gate,
            f"{p}mlp.up_proj.weight": up,
            f"{p}mlp.down_proj.weight": layer.mlp.w_down.weight,
            f"{p}input_layernorm.weight": layer.attn_norm,
            f"{p}post_attention_layernorm.weight": layer.mlp_norm,
        }
    return out


def save_drafter(model: Transformer, out_dir: str | Path, dtype=torch.float16) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous()
        for k, v in hf_state_dict(model).items()
    }
    save_file(tensors, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2))
    return out_dir
