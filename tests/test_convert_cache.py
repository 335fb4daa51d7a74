"""The converted-weights cache: keyed by the GGUF file's content, written atomically, shared by
concurrent processes (a tiny GGUF written here; see test_gguf.py for the writer)."""

from __future__ import annotations

import hashlib
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import distspec.models.loader as loader
from test_gguf import VOCAB, write_tiny_gguf
from tiny import make_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("gguf")
    d = make_tiny_model_dir(root / "hf", vocab_size=VOCAB, seed=5)
    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    write_tiny_gguf(hf, root / "tiny.gguf", f16_matrices=False)
    return root / "tiny.gguf"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DISTSPEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "converted"


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """The GGUF files convert_gguf is called on, in order."""
    calls: list[Path] = []
    real = loader.convert_gguf

    def counting(gguf_path, out_dir):
        calls.append(Path(gguf_path))
        return real(gguf_path, out_dir)

    monkeypatch.setattr(loader, "convert_gguf", counting)
    return calls


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir())


def weights_digest(model_dir: Path) -> str:
    w = loader.SafetensorsWeights(model_dir)
    h = hashlib.sha256()
    for name in sorted(w):
        h.update(name.encode() + w[name].numpy().tobytes())
    return h.hexdigest()


def test_same_bytes_in_two_directories_share_one_entry(tiny_gguf, tmp_path, cache, conversions):
    a, b = tmp_path / "checkout-a" / "tiny.gguf", tmp_path / "venv-b" / "tiny.gguf"
    for copy in (a, b):
        copy.parent.mkdir()
        shutil.copy(tiny_gguf, copy)
    out_a = loader.resolve_model_dir(str(a))
    out_b = loader.resolve_model_dir(str(b))
    assert out_a == out_b
    assert conversions == [a]
    assert entries(cache) == [out_a]
    loaded = loader.load_model(str(b), max_len=16)
    assert loaded.path == out_a and loaded.model.config.vocab_size == VOCAB


@pytest.mark.parametrize("whole_file_under", [loader._WHOLE_FILE_UNDER, 0])
def test_one_changed_tensor_byte_changes_the_key(
    tiny_gguf, tmp_path, monkeypatch, whole_file_under
):
    from gguf import GGUFReader

    monkeypatch.setattr(loader, "_WHOLE_FILE_UNDER", whole_file_under)  # 0: header + samples
    changed = tmp_path / "tiny.gguf"
    shutil.copy(tiny_gguf, changed)
    at = GGUFReader(str(tiny_gguf)).tensors[-1].data_offset + 5
    data = bytearray(changed.read_bytes())
    data[at] ^= 1
    changed.write_bytes(bytes(data))
    assert changed.stat().st_size == tiny_gguf.stat().st_size
    assert loader.gguf_content_key(changed) != loader.gguf_content_key(tiny_gguf)


def test_header_walk_ends_where_the_tensor_data_starts(tiny_gguf):
    import mmap

    from gguf import GGUFReader

    reader = GGUFReader(str(tiny_gguf))
    with open(tiny_gguf, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        end = loader._gguf_header_end(m)
    assert 0 <= reader.data_offset - end < reader.alignment
    assert not any(reader.data[end : reader.data_offset])  # only padding in between


def test_sampled_key_on_a_large_file(tmp_path, monkeypatch):
    """Over _WHOLE_FILE_UNDER only the header and evenly spaced blocks are hashed."""
    import gguf

    monkeypatch.setattr(loader, "_WHOLE_FILE_UNDER", 0)
    path = tmp_path / "big.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((1024, 2048), np.float32))  # 8 MiB of data
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    start = gguf.GGUFReader(str(path)).tensors[0].data_offset
    key = loader.gguf_content_key(path)

    def key_with_byte_changed(at: int) -> str:
        data = bytearray(path.read_bytes())
        data[at] ^= 1
        changed = tmp_path / "changed.gguf"
        changed.write_bytes(bytes(data))
        return loader.gguf_content_key(changed)

    assert key_with_byte_changed(40) != key  # in the header
    assert key_with_byte_changed(start) != key  # the first sampled block
    assert key_with_byte_changed(path.stat().st_size - 1) != key  # the last one
    assert key_with_byte_changed(start + loader._SAMPLE_BYTES + 1) == key  # between samples


def _convert_in_child(path: str, barrier, results) -> None:
    calls = []
    real = loader.convert_gguf

    def counting(*args):
        calls.append(args)
        return real(*args)

    loader.convert_gguf = counting
    barrier.wait()
    loaded = loader.load_model(path, max_len=16)
    results.put((len(calls), str(loaded.path), weights_digest(loaded.path)))


def test_concurrent_processes_convert_once(tiny_gguf, cache):
    ctx = multiprocessing.get_context("spawn")  # children inherit DISTSPEC_CACHE
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_convert_in_child, args=(str(tiny_gguf), barrier, results))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (n0, path0, digest0), (n1, path1, digest1) = got
    assert n0 + n1 == 1  # the second waited on the lock and found the first's entry
    assert path0 == path1 and digest0 == digest1
    assert entries(cache) == [Path(path0)]


def test_half_written_leftovers_are_not_used(tiny_gguf, cache, conversions):
    key = loader.gguf_content_key(tiny_gguf)
    leftover = cache / f"{key}.tmp-12345-deadbeef"  # a process killed while converting
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    (leftover / "model.safetensors").write_bytes(b"\0" * 100)
    unmarked = cache / key  # an entry's name without the marker: incomplete
    unmarked.mkdir()
    (unmarked / "config.json").write_text("{")
    old_style = cache / "tiny-0123456789ab"  # keyed by location, by older versions: kept
    old_style.mkdir()

    loaded = loader.load_model(str(tiny_gguf), max_len=16)
    assert loaded.path == unmarked and (unmarked / loader._MARKER).exists()
    assert len(conversions) == 1
    assert entries(cache) == sorted([unmarked, old_style])
    assert loader.load_model(str(tiny_gguf), max_len=16).path == unmarked
    assert len(conversions) == 1
