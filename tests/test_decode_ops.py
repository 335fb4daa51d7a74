"""distspec's fused fp32 decode ops (kernels/decode_ops.cpp) against PyTorch's own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distspec.models.cpu_kernels import kernels
from distspec.models.rope import apply_rope

pytestmark = pytest.mark.skipif(kernels() is None, reason="needs an AVX2 CPU and g++")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 5, 64), (3, 40)])
def test_rms_norm(shape):
    g = gen(len(shape))
    x, w = torch.randn(shape, generator=g), torch.randn(shape[-1], generator=g)
    ref = F.rms_norm(x.double(), w.shape, w.double(), 1e-5)
    got = kernels().rms_norm(x, w, 1e-5)
    assert got.shape == x.shape and torch.allclose(got.double(), ref, atol=1e-5)


def test_silu_mul():
    gu = torch.randn(2, 3, 2 * 48, generator=gen(2))
    gate, up = gu.split(48, dim=-1)
    assert torch.allclose(kernels().silu_mul(gu), F.silu(gate) * up, atol=1e-6)


def reference_attention(q, k_cache, v_cache, slots, pos, window):
    """SDPA over each row's slot, keys [p - window + 1, p] (window 0: all up to p)."""
    bsz, t, hq, d = q.shape
    kv_len = int(pos.max()) + 1
    k, v = k_cache[slots, :, :kv_len], v_cache[slots, :, :kv_len]
    key = torch.arange(kv_len)
    p = pos[:, None, :, None]
    mask = key <= p
    if window:
        mask &= key > p - window
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=True)
    return y.transpose(1, 2)


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize(
    "slots, pos",
    [
        ([0], [[17]]),  # a decode step
        ([2], [[9, 10, 11, 12, 13]]),  # a verification chunk
        ([3, 0, 1], [[4, 5, 6], [30, 31, 32], [0, 1, 2]]),  # a batch, each at its own place
    ],
    ids=["step", "chunk", "batch"],
)
def test_attend_rotates_writes_the_cache_and_reads_each_rows_slot(slots, pos, window):
    """From a fused qkv: RoPE bitwise PyTorch's (the keys land in the cache rotated exactly
    as apply_rope rotates them), values written as they are, and attention over each row's
    slot up to its own position (3 query heads per KV head)."""
    g = gen(len(slots) + window)
    k_cache = torch.randn(4, 2, 40, 16, generator=g)
    v_cache = torch.randn(4, 2, 40, 16, generator=g)
    slots, pos = torch.tensor(slots), torch.tensor(pos)
    bsz, t = pos.shape
    qkv = torch.randn(bsz, t, 6 + 2 * 2, 16, generator=g)
    cos = torch.randn(bsz, t, 1, 16, generator=g)
    sin = torch.randn(bsz, t, 1, 16, generator=g)
    qk = apply_rope(qkv[:, :, :8], cos, sin)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_k[slots[:, None], :, pos] = qk[:, :, 6:]
    want_v[slots[:, None], :, pos] = qkv[:, :, 8:]
    ref = reference_attention(qk[:, :, :6], want_k, want_v, slots, pos, window)
    got = kernels().attend(qkv, cos, sin, k_cache, v_cache, slots, pos, 6, window)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    assert torch.allclose(got, ref, atol=1e-5)


def test_attend_broadcasts_one_rope_row_over_the_batch():
    g = gen(9)
    cache = torch.zeros(2, 1, 8, 16)
    qkv = torch.randn(2, 1, 3, 16, generator=g)
    cos, sin = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)
    slots, pos = torch.tensor([0, 1]), torch.tensor([[0], [0]])
    kernels().attend(qkv, cos, sin, cache, cache.clone(), slots, pos, 1)
    assert torch.equal(cache[:, 0, 0], apply_rope(qkv[:, :, 1:2], cos, sin)[:, 0, 0])


def test_attend_refuses_positions_slots_and_heads_that_do_not_fit():
    c = torch.zeros(2, 1, 8, 16)
    qkv, cs = torch.zeros(1, 1, 3, 16), torch.zeros(1, 1, 1, 16)
    one = torch.tensor([0])
    with pytest.raises(RuntimeError, match="position out of the cache"):
        kernels().attend(qkv, cs, cs, c, c, one, torch.tensor([[8]]), 1)
    with pytest.raises(RuntimeError, match="bad slot"):
        kernels().attend(qkv, cs, cs, c, c, torch.tensor([2]), torch.tensor([[0]]), 1)
    with pytest.raises(RuntimeError, match="head counts do not fit"):
        kernels().attend(qkv, cs, cs, c, c, one, torch.tensor([[0]]), 2)


def test_the_model_runs_them_and_keeps_its_logits(tiny_dir, monkeypatch):
    """A tiny model's batched, ragged forward with the fused ops equals PyTorch's path."""
    from distspec.models import llama
    from distspec.models.loader import load_model
    from tiny import TINY_MAX_LEN

    model = load_model(str(tiny_dir), max_len=TINY_MAX_LEN, num_slots=3).model
    tokens = torch.randint(0, 200, (3, 6), generator=gen(3))
    pos = llama.pad_positions([0, 4, 9], 6)
    slots = torch.tensor([2, 0, 1])
    fused = model(tokens, pos, slots)
    monkeypatch.setattr(llama, "decode_ops", lambda x: None)
    plain = model(tokens, pos, slots)
    assert torch.allclose(fused, plain, atol=1e-4)


@pytest.mark.parametrize("weight_dtype", ["fp32", "int4", "int8"])
def test_a_fused_layer_is_bitwise_the_layer_it_replaces(tiny_dir, monkeypatch, weight_dtype):
    """kernels/decoder_layer.cpp runs a layer in one call, and the whole model after the
    embedding in another (DecoderStack): the same kernels in the same order as Block's own
    fp32 CPU path, so the logits (and the KV cache) are identical on all three paths."""
    from distspec.models import llama
    from distspec.models.loader import load_for_inference
    from tiny import TINY_MAX_LEN

    model = load_for_inference(
        str(tiny_dir), max_len=TINY_MAX_LEN, num_slots=3, weight_dtype=weight_dtype
    ).model
    assert all(layer.fused_layer() is not None for layer in model.layers)
    assert model.fused_stack() is not None
    tokens = torch.randint(0, 200, (3, 6), generator=gen(4))
    pos = llama.pad_positions([0, 4, 9], 6)
    slots = torch.tensor([2, 0, 1])
    step, step_pos = torch.randint(0, 200, (3, 1), generator=gen(5)), pos[:, -1:] + 1

    def run():
        prefill = model(tokens, pos, slots)
        return prefill, model(step, step_pos, slots), model.layers[-1].attn.kv_cache.k.clone()

    stack = run()
    monkeypatch.setattr(llama.Transformer, "fused_stack", lambda self: None)
    fused = run()
    monkeypatch.setattr(llama.Block, "fused_layer", lambda self: None)
    plain = run()
    for a, b, c in zip(stack, fused, plain, strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_a_fused_layer_follows_the_layers_it_was_built_from(tiny_dir):
    """Swapping a linear layer, switching int8 activations or a new KV cache rebuilds it;
    layers the kernels do not run (oneDNN-packed) keep the module path."""
    from distspec.models.linear import PackedLinear, set_activations
    from distspec.models.loader import load_for_inference
    from tiny import TINY_MAX_LEN

    model = load_for_inference(str(tiny_dir), max_len=TINY_MAX_LEN, weight_dtype="int4").model
    layer = model.layers[0]
    first = layer.fused_layer()
    assert layer.fused_layer() is first  # cached while nothing changes
    tokens, pos = torch.randint(0, 200, (1, 5), generator=gen(6)), torch.arange(5)[None]
    fp32_x = model(tokens, pos)
    set_activations(model, "int8")
    assert layer.fused_layer() is not first
    int8_x = model(tokens, pos)
    assert not torch.equal(fp32_x, int8_x)  # the int8 activations' rounding shows
    set_activations(model, "fp32")
    assert torch.equal(model(tokens, pos), fp32_x)
    before = layer.fused_layer()
    model.setup_cache(1, TINY_MAX_LEN)
    assert layer.fused_layer() is not before

    fp32 = load_for_inference(str(tiny_dir), max_len=TINY_MAX_LEN, weight_dtype="fp32").model
    stack = fp32.fused_stack()
    assert stack is not None and fp32.fused_stack() is stack
    fp32.layers[0].mlp.w_down = PackedLinear(torch.nn.Linear(128, 64))
    assert fp32.layers[0].fused_layer() is None and fp32.layers[1].fused_layer() is not None
    assert fp32.fused_stack() is None  # a layer does not fuse: the whole stack does not
    assert torch.isfinite(fp32(tokens, pos)).all()
    model.lm_head = PackedLinear(torch.nn.Linear(64, model.config.vocab_size, bias=False))
    assert model.fused_stack() is None and model.layers[0].fused_layer() is not None
