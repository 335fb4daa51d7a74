"""distspec's Transformer against Hugging Face transformers on tiny random Llama-family models.

Covers: logits parity (plain and oneDNN-packed linears), KV cache (prefill + decode, verification
chunks, rollback by position), batched ragged forward over cache slots, and error paths.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distspec.models.config import ModelConfig
from distspec.models.cpu_kernels import kernels
from distspec.models.linear import PackedLinear, SkinnyLinear, pack_for_cpu
from distspec.models.llama import Transformer, pad_positions
from distspec.models.loader import ModelNotFoundError, load_model
from distspec.models.rope import inverse_frequencies
from tiny import TINY_VOCAB, make_tiny_model_dir, perturb_weights

ATOL = 1e-4
PACKED_ATOL = 2e-4
SEQ = 24

LLAMA3_ROPE = {
    # transformers 5 stores this as `rope_parameters` (it accepts the legacy `rope_scaling` kwarg
    # and moves it there). original_max_position_embeddings is small so that, with head_dim 16,
    # the 8 frequencies fall in all three llama3 regimes: kept, smoothed and divided by factor.
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

VARIANTS: dict[str, dict] = {
    "llama_gqa": {},
    "qwen2_bias": {"model_type": "qwen2", "num_heads": 4, "num_kv_heads": 2},
    # window 8 < SEQ: the sliding window really cuts attention here
    "mistral_window": {"model_type": "mistral", "extra_config": {"sliding_window": 8}},
    "tied": {"tie_word_embeddings": True},
    "sharded": {"shards": 3},
    "llama3_rope": {"extra_config": {"rope_scaling": LLAMA3_ROPE}},
    "head_dim_32": {"extra_config": {"head_dim": 32}},
    "mha_mlp_bias": {"num_kv_heads": 4, "extra_config": {"mlp_bias": True}},
}


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    dirs = {}
    for i, (name, kwargs) in enumerate(VARIANTS.items()):
        d = make_tiny_model_dir(root / name, seed=10 + i, **kwargs)
        perturb_weights(d, seed=i)
        dirs[name] = d
    return dirs


@pytest.fixture(scope="module")
def hf_models(variant_dirs):
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = AutoModelForCausalLM.from_pretrained(
                str(variant_dirs[name]), dtype=torch.float32
            ).eval()
        return cache[name]

    return get


def random_ids(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(ids).logits.float()


def full_logits(model: Transformer, ids: torch.Tensor, slot: int = 0) -> torch.Tensor:
    """One forward of the whole sequence [1, T] from position 0 in `slot`."""
    t = ids.shape[1]
    return model(ids, torch.arange(t)[None], torch.tensor([slot]))


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    diff = (a.float() - b.float()).abs().max().item()
    assert a.shape == b.shape, (a.shape, b.shape)
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


# ---------------------------------------------------------------------------------------------
# parity with transformers


def test_variant_dirs_are_what_they_claim(variant_dirs):
    sharded = variant_dirs["sharded"]
    assert len(list(sharded.glob("*.safetensors"))) >= 3
    assert (sharded / "model.safetensors.index.json").exists()
    cfg = ModelConfig.from_json_file(variant_dirs["llama3_rope"] / "config.json")
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "llama3"
    plain = ModelConfig.from_json_file(variant_dirs["llama_gqa"] / "config.json")
    scaled, default = inverse_frequencies(cfg), inverse_frequencies(plain)
    # some frequencies kept, some divided by the factor, some smoothed in between
    ratio = default / scaled
    assert torch.isclose(ratio, torch.tensor(1.0)).any()
    assert torch.isclose(ratio, torch.tensor(8.0)).any()
    assert ((ratio > 1.01) & (ratio < 7.99)).any()
    assert ModelConfig.from_json_file(variant_dirs["qwen2_bias"] / "config.json").attention_bias
    assert ModelConfig.from_json_file(variant_dirs["tied"] / "config.json").tie_word_embeddings
    mistral = ModelConfig.from_json_file(variant_dirs["mistral_window"] / "config.json")
    assert mistral.sliding_window == 8


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant, variant_dirs, hf_models):
    ids = random_ids(SEQ, seed=1)
    ref = hf_logits(hf_models(variant), ids)
    loaded = load_model(str(variant_dirs[variant]), max_len=64)
    out = full_logits(loaded.model, ids)
    assert out.shape == (1, SEQ, TINY_VOCAB)
    assert ref.abs().max() > 1.0  # logits are not trivially tiny
    assert_close(out, ref)


@pytest.mark.parametrize("layer", [SkinnyLinear, PackedLinear], ids=["skinny", "onednn"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_logits_match_transformers(variant, layer, variant_dirs, hf_models):
    if layer is SkinnyLinear and kernels() is None:
        pytest.skip("distspec's CPU kernels need an AVX2 CPU and g++")
    if not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN not available")
    ids = random_ids(SEQ, seed=2)
    ref = hf_logits(hf_models(variant), ids)
    model = load_model(str(variant_dirs[variant]), max_len=64).model
    pack_for_cpu(model, use_kernels=layer is SkinnyLinear)
    packed = [m for m in model.modules() if isinstance(m, layer)]
    # 2 per attention (wqkv, wo), 2 per MLP, plus lm_head
    assert len(packed) == 4 * model.config.num_hidden_layers + 1
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert_close(full_logits(model, ids), ref, PACKED_ATOL)
    # decode shapes (one row) go through the packed kernels too
    model(ids[:, :10], torch.arange(10)[None])
    step = model(ids[:, 10:11], torch.tensor([[10]]))
    assert_close(step[0, 0], ref[0, 10], PACKED_ATOL)
    chunk = model(ids[:, 11:16], torch.arange(11, 16)[None])  # a verification chunk
    assert_close(chunk[0], ref[0, 11:16], PACKED_ATOL)


@pytest.mark.parametrize("rows", [1, 4, 12])
def test_logits_of_the_last_rows_only(variant_dirs, rows):
    model = load_model(str(variant_dirs["llama_gqa"]), max_len=64).model
    ids = random_ids(12, seed=3)
    full = full_logits(model, ids)
    last = model(ids, torch.arange(12)[None], last=rows)
    assert last.shape == (1, rows, TINY_VOCAB)
    assert_close(last[0], full[0, -rows:])


# ---------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("variant", ["llama_gqa", "mistral_window", "qwen2_bias"])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_prefill_then_decode_matches_full_forward(variant, packed, variant_dirs, hf_models):
    n_prefill = 5
    ids = random_ids(SEQ, seed=4)
    ref = hf_logits(hf_models(variant), ids)
    model = load_model(str(variant_dirs[variant]), max_len=64).model
    if packed:
        pack_for_cpu(model)
    atol = PACKED_ATOL if packed else ATOL
    full = full_logits(model, ids)
    assert_close(full, ref, atol)
    out = [model(ids[:, :n_prefill], torch.arange(n_prefill)[None])]
    for p in range(n_prefill, SEQ):
        out.append(model(ids[:, p : p + 1], torch.tensor([[p]])))
    steps = torch.cat(out, dim=1)
    assert_close(steps, full, atol)
    assert_close(steps, ref, atol)


def test_verification_chunks_match_full_forward(variant_dirs):
    """Prefill, then chunks of 3 tokens (the shape of speculative verification)."""
    model = load_model(str(variant_dirs["mistral_window"]), max_len=64).model
    ids = random_ids(SEQ, seed=5)
    full = full_logits(model, ids)
    out = [model(ids[:, :6], torch.arange(6)[None])]
    for p in range(6, SEQ, 3):
        out.append(model(ids[:, p : p + 3], torch.arange(p, p + 3)[None]))
    assert_close(torch.cat(out, dim=1), full)


def test_rollback_by_position(variant_dirs):
    """Positions 10..14 get tokens A; then B at 12..14 must see prefix + A[:2] + B only."""
    model = load_model(str(variant_dirs["llama_gqa"]), max_len=64).model
    prefix, a, b = random_ids(10, seed=6), random_ids(5, seed=7), random_ids(3, seed=8)
    assert not torch.equal(a[:, 2:], b)

    model(prefix, torch.arange(10)[None])
    logits_a = model(a, torch.arange(10, 15)[None])
    logits_b = model(b, torch.arange(12, 15)[None])

    fresh = load_model(str(variant_dirs["llama_gqa"]), max_len=64).model
    ref = full_logits(fresh, torch.cat([prefix, a[:, :2], b], dim=1))
    assert_close(logits_b, ref[:, 12:15])
    assert_close(logits_a[:, :2], ref[:, 10:12])
    # the test is meaningful: B's logits really differ from what A produced there
    assert (logits_b - logits_a[:, 2:]).abs().max() > 1e-2

    # roll back further and shorter: one decode step at 11 (stale keys at 12..14 are ignored),
    # then a 2-token chunk at 12..13 (stale key at 14 is ignored)
    c = random_ids(3, seed=9)
    step = model(c[:, :1], torch.tensor([[11]]))
    chunk = model(c[:, 1:], torch.tensor([[12, 13]]))
    ref2 = full_logits(fresh, torch.cat([prefix, a[:, :1], c], dim=1))
    assert_close(step, ref2[:, 11:12])
    assert_close(chunk, ref2[:, 12:14])


# ---------------------------------------------------------------------------------------------
# batched ragged forward over cache slots


@pytest.mark.parametrize("variant", ["llama_gqa", "mistral_window"])
def test_batched_ragged_forward_matches_single_sequences(variant, variant_dirs):
    path = str(variant_dirs[variant])
    model = load_model(path, max_len=64).model
    model.setup_cache(num_slots=4, max_len=64)
    alone = load_model(path, max_len=64).model  # reference: one sequence at a time, slot 0

    slots = [2, 0, 3]  # slot 1 is left holding garbage
    starts = [0, 4, 11]  # tokens already in the cache before the batched prompt
    lens = [5, 9, 3]
    prefixes = [random_ids(s, seed=20 + i) for i, s in enumerate(starts)]
    prompts = [random_ids(n, seed=30 + i) for i, n in enumerate(lens)]
    decode_tokens = random_ids(3, seed=40)
    chunk_tokens = random_ids(2 * 3, seed=41).view(3, 2)

    # fill every slot with unrelated keys/values, so stale entries would show up in the logits
    model(random_ids(30, seed=50, batch=4), torch.arange(30).expand(4, 30))
    for slot, prefix in zip(slots, prefixes, strict=True):
        if prefix.shape[1]:
            model(prefix, torch.arange(prefix.shape[1])[None], torch.tensor([slot]))

    width = max(lens)
    tokens = torch.full((3, width), 7, dtype=torch.long)  # right padding with an arbitrary token
    for i, p in enumerate(prompts):
        tokens[i, : lens[i]] = p[0]
    pos = pad_positions(starts, width)
    assert pos.tolist()[1] == list(range(4, 4 + width))
    slot_t = torch.tensor(slots)
    batched = model(tokens, pos, slot_t)
    assert batched.shape == (3, width, TINY_VOCAB)

    # batched decode: each sequence at its own position
    dec_pos = torch.tensor([[s + n] for s, n in zip(starts, lens, strict=True)])
    decoded = model(decode_tokens.view(3, 1), dec_pos, slot_t)
    # batched verification chunk of 2 tokens each, again at different positions
    chunk_pos = torch.cat([dec_pos + 1, dec_pos + 2], dim=1)
    chunked = model(chunk_tokens, chunk_pos, slot_t)

    for i in range(3):
        seq = torch.cat(
            [prefixes[i], prompts[i], decode_tokens[:, i : i + 1], chunk_tokens[i : i + 1]], dim=1
        )
        ref = full_logits(alone, seq)
        s, n = starts[i], lens[i]
        assert_close(batched[i, :n], ref[0, s : s + n])
        assert_close(decoded[i, 0], ref[0, s + n])
        assert_close(chunked[i], ref[0, s + n + 1 : s + n + 3])


def test_pad_positions():
    pos = pad_positions([0, 3, 10], 4)
    assert pos.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [10, 11, 12, 13]]
    assert pos.dtype == torch.long


def test_default_slots_are_rows(variant_dirs):
    """Without `slots`, row i uses cache slot i."""
    path = str(variant_dirs["llama_gqa"])
    model = load_model(path, max_len=32, num_slots=2).model
    ids = random_ids(8, seed=60, batch=2)
    both = model(ids, torch.arange(8).expand(2, 8))
    nxt = random_ids(2, seed=61).view(2, 1)
    step = model(nxt, torch.tensor([[8], [8]]))
    alone = load_model(path, max_len=32).model
    for i in range(2):
        ref = full_logits(alone, torch.cat([ids[i : i + 1], nxt[i : i + 1]], dim=1))
        assert_close(both[i], ref[0, :8])
        assert_close(step[i, 0], ref[0, 8])


# ---------------------------------------------------------------------------------------------
# errors


def test_forward_before_setup_cache_raises(variant_dirs):
    cfg = ModelConfig.from_json_file(variant_dirs["llama_gqa"] / "config.json")
    model = Transformer.empty(cfg)
    with pytest.raises(RuntimeError, match="setup_cache"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.arange(3)[None])


def test_position_past_cache_raises(variant_dirs):
    model = load_model(str(variant_dirs["llama_gqa"]), max_len=16).model
    assert model.max_len == 16
    model(torch.zeros(1, 16, dtype=torch.long), torch.arange(16)[None])  # fits exactly
    with pytest.raises(ValueError, match="past the KV cache"):
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[16]]))
    with pytest.raises(ValueError, match="past the KV cache"):
        model(torch.zeros(1, 17, dtype=torch.long), torch.arange(17)[None])


def test_cache_length_capped_by_max_position_embeddings(variant_dirs):
    model = load_model(str(variant_dirs["llama_gqa"]), max_len=100_000).model
    assert model.max_len == 512  # tiny models have max_position_embeddings=512


def test_load_missing_path_raises(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_model(str(tmp_path / "does-not-exist"))


def test_load_dir_without_config_raises(tmp_path, variant_dirs):
    d = tmp_path / "noconfig"
    d.mkdir()
    src = variant_dirs["llama_gqa"]
    for name in ("model.safetensors", "tokenizer.json"):
        (d / name).write_bytes((src / name).read_bytes())
    with pytest.raises(ModelNotFoundError):
        load_model(str(d))
    assert issubclass(ModelNotFoundError, ValueError)


def test_load_dir_without_weights_raises(tmp_path, variant_dirs):
    d = tmp_path / "noweights"
    d.mkdir()
    src = variant_dirs["llama_gqa"]
    for name in ("config.json", "tokenizer.json"):
        (d / name).write_bytes((src / name).read_bytes())
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        load_model(str(d))


def test_load_dir_without_tokenizer_raises(tmp_path, variant_dirs):
    d = tmp_path / "notokenizer"
    d.mkdir()
    src = variant_dirs["llama_gqa"]
    for name in ("config.json", "model.safetensors"):
        (d / name).write_bytes((src / name).read_bytes())
    with pytest.raises(ModelNotFoundError, match="tokenizer.json"):
        load_model(str(d))
