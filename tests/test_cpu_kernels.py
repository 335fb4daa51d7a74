"""distspec's own CPU kernels against PyTorch, and the layer that chooses them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distspec.models import cpu_kernels
from distspec.models.cpu_kernels import kernels, library_path, supported
from distspec.models.linear import PackedLinear, SkinnyLinear, pack_for_cpu


def test_kernels_build_where_supported():
    """On an AVX2 CPU with a compiler (this machine, CI) the kernels are built, not skipped."""
    assert (kernels() is not None) == supported()


@pytest.mark.skipif(not supported(), reason="needs an AVX2 CPU")
def test_a_built_library_is_imported_without_a_build_step(monkeypatch):
    """Processes after the first (every Ray actor) import the published file: no compiler
    run, no build lock that a killed process could leave behind."""
    import torch.utils.cpp_extension as ext

    assert kernels() is not None and library_path().exists()
    monkeypatch.setattr(ext, "load", lambda *a, **k: pytest.fail("the kernels were rebuilt"))
    assert cpu_kernels._import(library_path()).MAX_ROWS == kernels().MAX_ROWS


needs_kernels = pytest.mark.skipif(kernels() is None, reason="needs an AVX2 CPU and g++")


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 9, 16, 40])
@pytest.mark.parametrize("n, k", [(1, 8), (3, 5), (4, 64), (13, 37), (96, 576), (257, 100)])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_matches_matmul(rows, n, k, bias):
    rows = min(rows, kernels().MAX_ROWS)  # 16 on an AVX2 CPU, 64 with AVX-512
    g = torch.Generator().manual_seed(rows * 1000 + n * 10 + k)
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    got = kernels().skinny_linear(x, w, b)
    ref = (x.double() @ w.double().T + (0 if b is None else b.double())).float()
    # fp32 accumulation in another order: a few ulps of the dot products' magnitude
    tol = 1e-6 * (x.abs().double() @ w.abs().double().T).float().clamp_min(1)
    assert got.shape == (rows, n)
    assert ((got - ref).abs() <= 8 * tol).all()


@needs_kernels
@pytest.mark.parametrize("k", [200, 576])  # 576: AVX-512 tiles of W rows from 6 rows of x on
def test_skinny_linear_rows_do_not_depend_on_the_batch(k):
    """A row's output is the same alone or among 15 others (bitwise)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, k, generator=g), torch.randn(70, k, generator=g)
    together = kernels().skinny_linear(x, w)
    for i in range(16):
        assert torch.equal(kernels().skinny_linear(x[i : i + 1], w)[0], together[i])


@needs_kernels
def test_skinny_linear_keeps_leading_dims_and_checks_input():
    ops = kernels()
    w = torch.randn(6, 8)
    assert ops.skinny_linear(torch.randn(2, 3, 8), w).shape == (2, 3, 6)
    assert ops.skinny_linear(torch.randn(0, 8), w).shape == (0, 6)
    with pytest.raises(RuntimeError, match="columns"):
        ops.skinny_linear(torch.randn(1, 7), w)
    with pytest.raises(RuntimeError, match=f"at most {ops.MAX_ROWS} rows"):
        ops.skinny_linear(torch.randn(ops.MAX_ROWS + 1, 8), w)
    with pytest.raises(RuntimeError, match="float32"):
        ops.skinny_linear(torch.randn(1, 8).double(), w.double())


@needs_kernels
def test_skinny_layer_uses_blas_for_prefill_and_shares_a_tied_weight():
    lin = nn.Linear(24, 10, bias=True)
    layer = SkinnyLinear(lin, kernels())
    assert layer.weight.data_ptr() == lin.weight.data_ptr()
    for rows in (1, 16, 17, 40, kernels().MAX_ROWS + 1):
        x = torch.randn(rows, 24)
        torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-5)


def test_pack_for_cpu_picks_the_kernels_or_onednn():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4).to(torch.bfloat16))
    pack_for_cpu(model)
    fp32, bf16 = model[0], model[1]
    assert isinstance(fp32, SkinnyLinear if kernels() is not None else PackedLinear)
    # bf16 stays on oneDNN where it has bf16 kernels, else on PyTorch's own (it runs either way)
    bf16_onednn = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert isinstance(bf16, PackedLinear if bf16_onednn else nn.Linear)
    assert bf16(torch.ones(2, 8, dtype=torch.bfloat16)).shape == (2, 4)
