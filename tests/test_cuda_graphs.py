"""The step CUDA graphs record (models/cuda_graphs.py): `Transformer.forward` with a slot
number reads nothing back to the host and must give the eager step's logits and K/V. The
recording itself needs a GPU (`make gpu-check` compares captured and eager greedy output)."""

from __future__ import annotations

import pytest
import torch

from distspec.models.cpu_kernels import kernels
from distspec.models.loader import load_model
from tiny import make_tiny_model_dir

SEQ = 20


@pytest.fixture(scope="module", params=["llama", "window", "tied"])
def model_dir(request, tmp_path_factory):
    kwargs = {
        "llama": {},
        "window": {"model_type": "mistral", "extra_config": {"sliding_window": 6}},
        "tied": {"tie_word_embeddings": True},
    }[request.param]
    return make_tiny_model_dir(tmp_path_factory.mktemp(request.param), **kwargs)


def pair(model_dir):
    # float64: PyTorch's ops on this CPU too (the fused kernels take fp32 only)
    return [
        load_model(str(model_dir), dtype=torch.float64, max_len=48, num_slots=2).model
        for _ in range(2)
    ]


def test_a_slot_number_step_equals_the_eager_step(model_dir):
    eager, recordable = pair(model_dir)
    ids = torch.randint(0, 200, (1, SEQ), generator=torch.Generator().manual_seed(1))
    slot = torch.tensor([1])
    # prefill of 5, single steps, then 3-token verification chunks, in slot 1 of 2
    steps = [(p, p + 1) for p in range(5, 11)]
    chunks = [(p, p + 3) for p in range(11, SEQ - 2, 3)]
    spans = [(0, 5), *steps, *chunks]
    for a, b in spans:
        pos = torch.arange(a, b)[None]
        want = eager(ids[:, a:b], pos, slot)
        got = recordable(ids[:, a:b], pos, 1)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    for le, lr in zip(eager.layers, recordable.layers, strict=True):
        torch.testing.assert_close(lr.attn.kv_cache.k, le.attn.kv_cache.k, rtol=0, atol=1e-12)
        torch.testing.assert_close(lr.attn.kv_cache.v, le.attn.kv_cache.v, rtol=0, atol=1e-12)
    assert not recordable.layers[0].attn.kv_cache.k[0].any()  # slot 0 untouched


def test_last_rows_and_rollback_by_position(model_dir):
    eager, recordable = pair(model_dir)
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(2))
    for m, s in ((eager, torch.tensor([0])), (recordable, 0)):
        m(ids[:, :8], torch.arange(8)[None], s)
    # a rejected draft rolled back: positions 5.. are written again with other tokens
    want = eager(ids[:, 8:12], torch.arange(5, 9)[None], torch.tensor([0]), last=2)
    got = recordable(ids[:, 8:12], torch.arange(5, 9)[None], 0, last=2)
    assert got.shape == want.shape == (1, 2, want.shape[-1])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.skipif(kernels() is None, reason="the fused fp32 kernels are what refuses")
def test_an_fp32_cpu_model_refuses_a_slot_number(model_dir):
    model = load_model(str(model_dir), max_len=48).model
    with pytest.raises(ValueError, match="slot number"):
        model(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), 0)
