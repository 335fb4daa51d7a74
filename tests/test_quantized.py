"""Weight-only quantized linears: ggml's block formats, their kernels, and quantized targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distspec.models.cpu_kernels import kernels
from distspec.models.linear import QuantLinear
from distspec.models.llama import pad_positions
from distspec.models.loader import QuantizedWeights, load_model
from distspec.models.quantized import (
    GGML_Q4_0,
    GGML_Q4_1,
    GGML_Q8_0,
    Q4Tiles,
    Q4Weight,
    Q8Tiles,
    Q8Weight,
    cat_rows,
    quantize,
    round_activations,
    take_cols,
    take_rows,
)
from distspec.spec_decode.sampling import SamplingParams
from tiny import TINY_MAX_LEN

FORMATS = [Q4Weight, Q8Weight]
needs_kernels = pytest.mark.skipif(kernels() is None, reason="needs an AVX2 CPU and g++")


def gguf_blocks(w: Q4Weight | Q8Weight, ggml_type: int) -> np.ndarray:
    """The GGUF byte blocks [N, groups * block bytes] that hold w."""
    n, g = w.scales.shape
    d = w.scales.numpy().view(np.uint8).reshape(n, g, 2)
    if ggml_type == GGML_Q8_0:
        parts = [d, w.qs.numpy().view(np.uint8).reshape(n, g, 32)]
    elif ggml_type == GGML_Q4_1:
        parts = [d, w.mins.numpy().view(np.uint8).reshape(n, g, 2), w.qs.numpy().reshape(n, g, 16)]
    else:
        parts = [d, w.qs.numpy().reshape(n, g, 16)]
    return np.concatenate(parts, axis=-1).reshape(n, -1)


@pytest.mark.parametrize("ggml_type", [GGML_Q4_0, GGML_Q4_1, GGML_Q8_0])
def test_gguf_blocks_are_reused_bit_for_bit(ggml_type):
    """from_gguf keeps every integer and fp16 scale of the file's blocks (writing them back
    gives the same bytes), and dequantizes to exactly the values gguf's reference does."""
    from gguf.quants import dequantize
    from gguf.quants import quantize as gguf_quantize

    w = np.random.default_rng(ggml_type).standard_normal((48, 96)).astype(np.float32)
    raw = gguf_quantize(w, ggml_type)
    fmt = Q8Weight if ggml_type == GGML_Q8_0 else Q4Weight
    q = fmt.from_gguf(raw, ggml_type)
    assert q.shape == (48, 96)
    if ggml_type != GGML_Q4_0:  # Q4_0 has no min of its own: it is -8 * scale here
        assert np.array_equal(gguf_blocks(q, ggml_type), raw)
    ref = torch.from_numpy(dequantize(raw, ggml_type).astype(np.float32))
    assert torch.equal(q.dequantize(), ref)


@pytest.mark.parametrize(
    "fmt, ggml_type", [(Q4Weight, GGML_Q4_1), (Q8Weight, GGML_Q8_0)], ids=["int4", "int8"]
)
def test_quantizing_here_rounds_as_ggml_does(fmt, ggml_type):
    """A model quantized at load is one llama.cpp's reference quantizer would have written."""
    from gguf.quants import quantize as gguf_quantize

    w = torch.randn(40, 128, generator=torch.Generator().manual_seed(1))
    w[3, :32] = 0.25  # a constant group: scale 0
    ours = gguf_blocks(fmt.quantize(w), ggml_type)
    assert np.array_equal(ours, gguf_quantize(w.numpy(), ggml_type))


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantization_error_is_within_half_a_step(fmt):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    q = fmt.quantize(w)
    step = q.scales.float().repeat_interleave(32, dim=1)
    # half a step of rounding, plus the fp16 rounding of scale (and min) times the code
    assert ((q.dequantize() - w).abs() <= 0.5 * step + 2e-3 * w.abs().amax(1, keepdim=True)).all()


@pytest.mark.parametrize("n, k", [(1, 32), (16, 64), (33, 576)])
def test_q4_tiles_move_the_bits_and_nothing_else(n, k):
    """The kernels' tiles (Q4Tiles) hold each code, scale and min where the layout says, and
    give the planar weight back bit for bit; rows past n are zero."""
    q = Q4Weight.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(n)))
    tiles = Q4Tiles.from_planar(q)
    assert tiles.data.shape == (-(-n // 16), k // 32, 320)
    assert all(torch.equal(a, b) for a, b in zip(tiles.planar().parts(), q.parts(), strict=True))
    codes, d = q.codes(), tiles.data
    for row, col in [(0, 0), (n - 1, k - 1), (n // 2, k // 3), (n - 1, 5)]:
        t, r, g, j, b = row // 16, row % 16, col // 32, col % 32 // 8, col % 4
        byte = d[t, g, 64 * j + 4 * r + b].item()
        assert (byte >> 4 if col % 8 >= 4 else byte & 0x0F) == codes[row, col]
        assert d[t, g, 256 + 2 * r : 258 + 2 * r].view(torch.float16) == q.scales[row, g]
        assert d[t, g, 288 + 2 * r : 290 + 2 * r].view(torch.float16) == q.mins[row, g]
    if n % 16:
        assert not d[-1, :, :256].reshape(-1, 4, 16, 4)[:, :, n % 16 :].any()


@pytest.mark.parametrize("n, k", [(1, 32), (16, 64), (33, 576)])
def test_q8_tiles_move_the_bits_and_nothing_else(n, k):
    q = Q8Weight.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(n)))
    tiles = Q8Tiles.from_planar(q)
    assert tiles.data.shape == (-(-n // 16), k // 32, 544)
    assert all(torch.equal(a, b) for a, b in zip(tiles.planar().parts(), q.parts(), strict=True))
    d = tiles.data
    for row, col in [(0, 0), (n - 1, k - 1), (n // 2, k // 3), (n - 1, 5)]:
        t, r, g, j, b = row // 16, row % 16, col // 32, col % 32 // 4, col % 4
        assert d[t, g, 64 * j + 4 * r + b].view(torch.int8) == q.qs[row, col]
        assert d[t, g, 512 + 2 * r : 514 + 2 * r].view(torch.float16) == q.scales[row, g]


@needs_kernels
@pytest.mark.parametrize("fmt, tile_bytes", [(Q4Weight, 320), (Q8Weight, 544)])
def test_a_quantized_layer_keeps_only_its_tiles(fmt, tile_bytes):
    q = fmt.quantize(torch.randn(40, 64, generator=torch.Generator().manual_seed(6)))
    layer = QuantLinear(q)
    assert [b.shape for b in layer.buffers()] == [(3, 2, tile_bytes)]
    assert all(torch.equal(a, b) for a, b in zip(layer.weight.parts(), q.parts(), strict=True))


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 16, 17, 40])
@pytest.mark.parametrize("n, k", [(1, 32), (7, 64), (96, 576), (33, 1536)])
@pytest.mark.parametrize("bias", [False, True])
def test_quant_kernels_match_the_dequantized_matmul(fmt, rows, n, k, bias):
    g = torch.Generator().manual_seed(rows * 1000 + n * 10 + k)
    q = fmt.quantize(torch.randn(n, k, generator=g))
    x = torch.randn(rows, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    got = QuantLinear(q, b)(x)
    w = q.dequantize().double()
    ref = x.double() @ w.T + (0 if b is None else b.double())
    # fp32 accumulation in another order: a few ulps of the dot products' magnitude
    tol = 1e-6 * (x.abs().double() @ w.abs().T).clamp_min(1)
    assert got.shape == (rows, n)
    assert ((got.double() - ref).abs() <= 8 * tol).all()


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_kernel_rows_do_not_depend_on_the_batch(fmt):
    g = torch.Generator().manual_seed(3)
    layer = QuantLinear(fmt.quantize(torch.randn(70, 256, generator=g)))
    x = torch.randn(16, 256, generator=g)
    together = layer(x)
    for i in range(16):
        assert torch.equal(layer(x[i : i + 1])[0], together[i])


@pytest.mark.parametrize("fmt", FORMATS)
def test_without_kernels_the_weight_is_dequantized(fmt):
    g = torch.Generator().manual_seed(4)
    q = fmt.quantize(torch.randn(24, 64, generator=g))
    layer = QuantLinear(q)
    layer.ops = None  # as on a CPU without AVX2 (or on CUDA)
    x = torch.randn(3, 64, generator=g)
    assert torch.allclose(layer(x), x @ q.dequantize().T, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_and_columns_slice_like_the_dequantized_matrix(fmt):
    w = fmt.quantize(torch.randn(20, 128, generator=torch.Generator().manual_seed(5)))
    full = w.dequantize()
    assert torch.equal(take_rows(w, 4, 9).dequantize(), full[4:9])
    assert torch.equal(take_cols(w, 32, 96).dequantize(), full[:, 32:96])
    both = cat_rows([take_rows(w, 0, 3), take_rows(w, 10, 20)])
    assert torch.equal(both.dequantize(), torch.cat([full[:3], full[10:]]))
    with pytest.raises(ValueError, match="multiples of 32"):
        take_cols(w, 0, 48)


def test_unknown_dtype_and_unaligned_inputs_are_refused():
    with pytest.raises(ValueError, match="unknown quantized dtype"):
        quantize(torch.zeros(4, 32), "int3")
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(torch.zeros(4, 40), "int8")
    with pytest.raises(ValueError, match="weight dtype must be one of fp32, int8, int4"):
        load_model("demo", weight_dtype="fp8")


def dequantized_reference(tiny_dir, dtype: str):
    """tiny_dir in fp32 with every linear weight replaced by its quantized-then-dequantized
    value: what a quantized model must compute."""
    from distspec.models.loader import SafetensorsWeights

    weights = SafetensorsWeights(tiny_dir)
    quantized = QuantizedWeights(weights, dtype)
    ref = {n: weights[n] for n in weights}
    for n in ref:
        if QuantizedWeights.is_linear(n):
            ref[n] = quantized[n].dequantize()
    model = load_model(str(tiny_dir), max_len=TINY_MAX_LEN, num_slots=2).model
    model.load_hf_state_dict(ref)
    return model


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_a_quantized_model_computes_its_dequantized_weights(tiny_dir, dtype):
    quant = load_model(str(tiny_dir), max_len=TINY_MAX_LEN, num_slots=2, weight_dtype=dtype).model
    linears = [m for m in quant.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 * 4 + 1 and {m.kind for m in linears} == {dtype}  # + the head
    ref = dequantized_reference(tiny_dir, dtype)
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(6))
    pos = pad_positions([0, 0], 12)
    got, want = quant(tokens, pos), ref(tokens, pos)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("activations", ["fp32", "int8"])
def test_speculative_decoding_with_an_int4_target_equals_its_own_greedy_decoding(
    tiny_dir, tiny_drafter_dir, activations
):
    """Lossless means lossless to the target as served: sd with an int4 target produces
    exactly the tokens that plain decoding of that int4 target does (with either
    activations: a row's int8 rounding does not depend on its neighbours either)."""
    from distspec.engine import Engine, EngineConfig

    prompt = list(b"The quick brown fox jumps over")
    params = SamplingParams(max_new_tokens=40)
    out = {}
    for mode in ("ar", "sd"):
        engine = Engine(
            EngineConfig(
                target=str(tiny_dir),
                mode=mode,
                drafter=str(tiny_drafter_dir),
                max_len=TINY_MAX_LEN,
                target_dtype="int4",
                target_activations=activations,
            )
        )
        head = engine.target.model.lm_head
        assert isinstance(head, QuantLinear) and head.int8_activations == (activations == "int8")
        out[mode] = engine.decoder.generate(prompt, params)[0]
    assert len(out["ar"]) == 40 and out["sd"] == out["ar"]


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 17])
def test_int8_activations_match_the_rounded_input_product(fmt, rows):
    """int8 activations: x rounded per group of 32 (round_activations), then the exact
    product with the dequantized weight; a row does not depend on its batch."""
    g = torch.Generator().manual_seed(rows)
    q = fmt.quantize(torch.randn(96, 576, generator=g))
    layer = QuantLinear(q, torch.randn(96, generator=g), int8_activations=True)
    x = torch.randn(rows, 576, generator=g)
    got = layer(x).double()
    w = q.dequantize().double()
    ref = round_activations(x).double() @ w.T + layer.bias.double()
    assert ((got - ref).abs() <= 1e-5 * ref.abs().max()).all()
    assert torch.equal(layer(x[:1]), layer(x)[:1])
    layer.ops = None  # PyTorch's path computes the same
    assert torch.allclose(layer(x).double(), ref, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("n, k", [(2, 32), (7, 96), (96, 576), (33, 1536)])
def test_int4_int8_output_rows_do_not_depend_on_their_neighbours(n, k):
    """int8 activations, one row of x: each output row equals its row of W alone, bit for
    bit, whatever its neighbours (odd row counts and an odd group count included)."""
    g = torch.Generator().manual_seed(n)
    q = Q4Weight.quantize(torch.randn(n, k, generator=g))
    bias = torch.randn(n, generator=g)
    x = torch.randn(1, k, generator=g)
    whole = QuantLinear(q, bias, int8_activations=True)(x)
    for i in range(n):
        alone = QuantLinear(take_rows(q, i, i + 1), bias[i : i + 1], int8_activations=True)
        assert torch.equal(alone(x)[0, 0], whole[0, i])


def test_round_activations_rounds_per_group_like_q8_0():
    x = torch.tensor([[1.0, -0.5, 0.25] + [0.0] * 29 + [0.0] * 32])
    r = round_activations(x)
    assert torch.equal(r[0, 32:], torch.zeros(32))  # an all-zero group stays zero
    step = 1.0 / 127
    assert torch.allclose(r[0, :3], torch.tensor([1.0, -64 * step, 32 * step]))


def test_set_activations_switches_every_quantized_layer(tiny_dir):
    from distspec.models.linear import set_activations

    model = load_model(str(tiny_dir), max_len=TINY_MAX_LEN, weight_dtype="int4").model
    set_activations(model, "int8")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.int8_activations for m in layers)
    with pytest.raises(ValueError, match="fp32 or int8"):
        set_activations(model, "bf16")
