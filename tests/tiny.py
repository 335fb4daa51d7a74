"""Tiny random Llama-family models, built in code, for fast tests (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]


def byte_tokenizer() -> Tokenizer:
    """Byte-level tokenizer: 256 byte tokens (ids 0..255) then SPECIALS (256..260)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: _byte_of(c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def _byte_of(c: str) -> int:
    # GPT-2 byte<->unicode map: printable bytes map to themselves, others to 256 + n
    from tokenizers.pre_tokenizers import ByteLevel  # noqa: F401

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(cs, bs, strict=True))[ord(c)]


TINY_VOCAB = 256 + len(SPECIALS)
EOS_ID = 257  # "</s>"
TINY_MAX_LEN = 256  # positions of the shared `target` and `draft_model` fixtures
SMALL_V = 8  # vocabulary of the `small` pair: joint distributions can be enumerated


def make_tiny_model_dir(
    path: str | Path,
    *,
    model_type: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    shards: int = 1,
    vocab_size: int = TINY_VOCAB,
    extra_config: dict | None = None,
) -> Path:
    """Save a random transformers model + byte tokenizer as an HF directory; return the path."""
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cls_cfg, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[model_type]
    cfg = cls_cfg(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=256,
        eos_token_id=EOS_ID,
        **(extra_config or {}),
    )
    torch.manual_seed(seed)
    model = cls_model(cfg).float().eval()
    # Random init is near-uniform; scale the head so greedy/sampled outputs are peaky and varied.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    max_shard = None if shards == 1 else f"{max(1, _param_bytes(model) // shards // 1000)}KB"
    kwargs = {"safe_serialization": True}
    if max_shard:
        kwargs["max_shard_size"] = max_shard
    model.save_pretrained(str(path), **kwargs)
    byte_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE})
    )
    return path


def perturb_weights(model_dir: Path, seed: int = 0) -> None:
    """Random norm weights and biases (transformers initialises them to 1 / 0), in place, so
    that a dropped, misplaced or wrongly sharded norm or bias shows in the logits."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            metadata = h.metadata()
            tensors = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
        for k, t in tensors.items():
            if k.endswith("norm.weight"):
                tensors[k] = 1.0 + 0.3 * torch.randn(t.shape, generator=gen)
            elif k.endswith(".bias"):
                tensors[k] = 0.5 * torch.randn(t.shape, generator=gen)
        save_file(tensors, str(f), metadata=metadata)


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
