"""Drafter training pieces on tiny models: prompts, batched data generation, the reduced-vocab
drafter, distillation, checkpoints, and the whole pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from distspec.datasets import load_prompts
from distspec.models.loader import load_drafter_model, load_model
from distspec.models.tokenizer import ChatMessage
from distspec.spec_decode.decoding import SpeculativeDecoder
from distspec.spec_decode.drafters import ModelDrafter
from distspec.spec_decode.drafters.factory import build_drafter
from distspec.spec_decode.sampling import SamplingParams
from distspec.train.datagen import generate_samples, load_samples, save_samples
from distspec.train.draft_model import frequency_vocab, init_drafter, save_drafter
from distspec.train.pipeline import DrafterRecipe, run
from distspec.train.prompts import derived_prompts, training_prompts
from distspec.train.self_instruct import query_prefix
from distspec.train.trainer import TrainConfig, distill_loss, make_batch, train
from tiny import EOS_ID


@pytest.fixture(scope="module")
def target(tiny_dir):
    return load_model(str(tiny_dir), num_slots=3, max_len=128)


def test_training_prompts_are_deterministic_distinct_and_apart_from_benchmarks():
    a, b = training_prompts(500, seed=3), training_prompts(500, seed=3)
    assert a == b and len(set(a)) == 500
    assert training_prompts(50, seed=4) != a[:50]
    assert not set(training_prompts(3000)) & set(load_prompts(None, None))


SOURCES = [
    "Sure! Here is a summary.\n\n"
    + " ".join(f"Sentence number {i} talks about rivers, maps and old towns." for i in range(4))
    + "\n\n## Heading that is skipped\n\nToo short.",
    "Here is the code:\n\n```python\ndef add(a, b):\n    total = a + b\n    return total\n```\n"
    + "\n\n"
    + " ".join(f"The function adds two numbers, case {i}, and returns the sum." for i in range(3)),
]


def test_derived_prompts_quote_paragraphs_and_code_of_the_sources():
    a = derived_prompts(SOURCES, 40, seed=1)
    assert a == derived_prompts(SOURCES, 40, seed=1) and len(set(a)) == 40
    assert a != derived_prompts(SOURCES, 40, seed=2)
    assert not set(a) & set(load_prompts(None, None))
    quoted_code = [p for p in a if "def add(a, b):" in p]
    assert quoted_code and all("```" not in p and "Heading" not in p for p in a)
    assert any("Sentence number 0" in p for p in a)
    bug_tasks = [p for p in quoted_code if p.startswith(("Find and fix", "There is a mistake"))]
    assert bug_tasks and all(
        "total = a + b\n    return total" not in p for p in bug_tasks
    )  # a bug was planted
    with pytest.raises(ValueError, match="no usable"):
        derived_prompts(["short", "no code"], 3)


def test_self_instruct_prefix_is_the_chat_prompt_up_to_the_user_message(target):
    tok = target.tokenizer
    prefix = query_prefix(tok)
    full = tok.encode_chat([ChatMessage("user", "What is a river?")])
    assert 0 < len(prefix) < len(full) and full[: len(prefix)] == prefix
    assert "river" not in tok.decode(prefix)


def test_batched_generation_equals_single_sequence_decoding(target):
    tok = target.tokenizer
    prompts = ["Hello", "abcabc", "The fox", "x", "Once upon a time", "12345", "zz"]
    requests = [(tok.encode(p), 0.0) for p in prompts]  # 7 requests through 3 slots
    samples = generate_samples(
        target.model, requests, max_new_tokens=12, stop_ids=[EOS_ID], top_k=5, progress=False
    )
    single = load_model(str(target.path), max_len=128)
    dec = SpeculativeDecoder(single.model, None, eos_token_ids=[EOS_ID])
    for (ids, _), s in zip(requests, samples, strict=True):
        expected, _ = dec.generate(ids, SamplingParams(max_new_tokens=12))
        assert s.prompt_ids == ids
        assert s.output_ids == expected
        assert s.topk_ids.shape == (len(expected), 5)
        assert s.topk_ids[:, 0].tolist() == expected  # greedy: the top-1 is what was emitted
        assert bool((s.topk_logprobs[:, :-1] >= s.topk_logprobs[:, 1:]).all())


def test_sampled_generation_is_seeded(target, tmp_path):
    tok = target.tokenizer
    requests = [(tok.encode("Hello"), 1.0), (tok.encode("abc"), 0.7)]
    kw = dict(max_new_tokens=10, stop_ids=[], top_k=4, seed=7, progress=False)
    a = generate_samples(target.model, requests, **kw)
    b = generate_samples(target.model, requests, **kw)
    assert [s.output_ids for s in a] == [s.output_ids for s in b]
    save_samples(a, tmp_path / "d.pt")
    back = load_samples(tmp_path / "d.pt")
    assert back[1].output_ids == a[1].output_ids and back[1].temperature == 0.7
    assert torch.equal(back[0].topk_logprobs, a[0].topk_logprobs)


def test_frequency_vocab_keeps_always_ids_and_most_frequent(target):
    tok = target.tokenizer
    samples = generate_samples(
        target.model,
        [(tok.encode("abcabc"), 1.0)] * 3,
        max_new_tokens=20,
        stop_ids=[],
        top_k=4,
        progress=False,
    )
    vocab = frequency_vocab(samples, 6, always=[EOS_ID])
    assert len(vocab) == 6 and EOS_ID in vocab.tolist()
    assert vocab.tolist() == sorted(vocab.tolist())
    # what the target emitted and its near-misses (its top 4 at each position)
    seen = [t for s in samples for t in s.output_ids + s.topk_ids[:, :4].flatten().tolist()]
    counts = torch.bincount(torch.tensor(seen), minlength=target.model.config.vocab_size)
    kept = [t for t in vocab.tolist() if t != EOS_ID]
    left_out = [t for t in range(len(counts)) if t not in vocab.tolist()]
    assert min(counts[kept]) >= max(counts[left_out])  # the most frequent (ties either way)


def test_drafter_of_all_target_layers_reproduces_the_target(target):
    tm = target.model
    drafter = init_drafter(tm, list(range(tm.config.num_hidden_layers)), None)
    drafter.setup_cache(1, 64)
    x = torch.tensor([target.tokenizer.encode("Hello world")])
    pos = torch.arange(x.shape[1])[None]
    ref = tm(x, pos)
    assert torch.allclose(drafter(x, pos), ref, atol=1e-5)
    assert drafter.embed is tm.embed  # shared, not copied


def test_reduced_vocab_head_scores_only_its_tokens(target):
    tm = target.model
    vocab = torch.tensor([3, 50, 97, EOS_ID])
    drafter = init_drafter(tm, list(range(tm.config.num_hidden_layers)), vocab)
    drafter.setup_cache(1, 64)
    x = torch.tensor([target.tokenizer.encode("Hi")])
    pos = torch.arange(x.shape[1])[None]
    full, ref = drafter(x, pos), tm(x, pos)
    assert torch.allclose(full[..., vocab], ref[..., vocab], atol=1e-5)
    outside = torch.ones(full.shape[-1], dtype=torch.bool)
    outside[vocab] = False
    assert bool(torch.isinf(full[..., outside]).all())


def test_saved_drafter_loads_back_with_the_targets_embedding(target, tmp_path):
    tm = target.model
    drafter = init_drafter(tm, [1], torch.arange(0, 261, 3))
    save_drafter(drafter, tmp_path / "d", dtype=torch.float32)
    assert not (tmp_path / "d" / "tokenizer.json").exists()
    loaded = load_drafter_model(str(tmp_path / "d"), target, max_len=64)
    assert loaded.model.embed is tm.embed and loaded.tokenizer is target.tokenizer
    drafter.setup_cache(1, 64)
    x = torch.tensor([target.tokenizer.encode("abc")])
    pos = torch.arange(3)[None]
    assert torch.allclose(loaded.model(x, pos), drafter(x, pos), atol=1e-6)
    with pytest.raises(ValueError, match="tokenizer.json|target's embedding"):
        load_model(str(tmp_path / "d"))


def _data(target, n=12):
    tok = target.tokenizer
    reqs = [(tok.encode(p), t) for p in ["abc", "Hello", "The fox", "xyz"] for t in (0.0, 1.0)]
    return generate_samples(
        target.model, reqs[:n], max_new_tokens=16, stop_ids=[], top_k=8, progress=False
    )


def test_distillation_reduces_loss_and_resumes_exactly(target, tmp_path):
    samples = _data(target)
    tm = target.model
    vocab = frequency_vocab(samples, 64, always=[EOS_ID])
    full_to_draft = torch.full((tm.config.vocab_size,), -1, dtype=torch.long)
    full_to_draft[vocab] = torch.arange(len(vocab))
    cfg = TrainConfig(steps=30, batch_size=4, lr=3e-3, warmup=2, checkpoint_every=10, seed=1)

    fresh = init_drafter(tm, [0], vocab)
    batch = make_batch(samples, full_to_draft, 64)
    before = distill_loss(fresh, batch)[0].item()
    history = train(fresh, samples, full_to_draft, cfg, tmp_path / "a.pt", progress=False)
    after = distill_loss(fresh, batch)[0].item()
    assert after < 0.8 * before, (before, after)
    assert [h["step"] for h in history] == list(range(1, 31))

    resumed = init_drafter(tm, [0], vocab)
    train(resumed, samples, full_to_draft, cfg, tmp_path / "b.pt", progress=False, stop_at=13)
    resumed = init_drafter(tm, [0], vocab)  # a new process: only the checkpoint survives
    train(resumed, samples, full_to_draft, cfg, tmp_path / "b.pt", progress=False)
    for (name, p), q in zip(fresh.named_parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name


def test_pipeline_end_to_end_on_a_tiny_target(tiny_dir, tmp_path):
    recipe = DrafterRecipe(
        target=str(tiny_dir),
        out_dir=str(tmp_path / "run"),
        num_prompts=12,
        self_instruct_prompts=0,  # a random tiny model writes neither requests nor paragraphs
        derived_prompts=0,
        heldout_prompts=2,
        max_new_tokens=12,
        gen_batch=4,
        top_k=8,
        layers=[1],
        draft_vocab=64,
        gamma=3,
        train=TrainConfig(steps=8, batch_size=4, checkpoint_every=4),
    )
    record = run(recipe)
    saved = json.loads((tmp_path / "run" / "drafter" / "training_record.json").read_text())
    assert saved["tokens_per_target_forward"] == record["tokens_per_target_forward"] >= 1.0
    assert 0.0 <= saved["acceptance_rate"] <= 1.0 and saved["train_sequences"] == 12
    tgt = load_model(str(tiny_dir), max_len=128)
    drafter = build_drafter(str(tmp_path / "run" / "drafter"), tgt, max_len=128)
    assert isinstance(drafter, ModelDrafter)
    prompt = tgt.tokenizer.encode("Hello")
    params = SamplingParams(max_new_tokens=20)
    ar, _ = SpeculativeDecoder(tgt.model, None, eos_token_ids=[]).generate(prompt, params)
    sd, _ = SpeculativeDecoder(tgt.model, drafter, 3, eos_token_ids=[]).generate(prompt, params)
    assert sd == ar
    assert run(recipe)["train_sequences"] == 12  # a second run reuses every stage's output
    recipe.num_prompts = 10
    with pytest.raises(ValueError, match="another recipe"):
        run(recipe)  # never trains on stale data
