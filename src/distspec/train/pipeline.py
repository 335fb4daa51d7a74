"""`distspec train-drafter`: data generation -> draft vocabulary -> distillation -> evaluation.

Every stage writes its result into the output directory and is skipped when that result is
already there, so an interrupted run resumes (training itself resumes from its checkpoint).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from distspec.engine import build_drafter, load_for_inference
from distspec.models.loader import LoadedModel, load_model
from distspec.models.tokenizer import ChatMessage
from distspec.spec.decoding import SpeculativeDecoder
from distspec.spec.draft_policy import measure_costs
from distspec.spec.sampling import SamplingParams
from distspec.train.datagen import generate_samples, load_samples, save_samples
from distspec.train.draft_model import frequency_vocab, init_drafter, save_drafter
from distspec.train.prompts import training_prompts
from distspec.train.trainer import TrainConfig, train

log = logging.getLogger(__name__)


@dataclass
class DrafterRecipe:
    target: str = "demo"
    out_dir: str = "drafter-run"
    num_prompts: int = 3600
    heldout_prompts: int = 24
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.7, 1.0])
    max_new_tokens: int = 160
    gen_batch: int = 32
    top_k: int = 32
    layers: list[int] = field(default_factory=lambda: [0, 1])
    draft_vocab: int = 8192  # 0 = full vocabulary
    gamma: int = 4
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)


def run(recipe: DrafterRecipe) -> dict:
    torch.manual_seed(recipe.seed)
    out = Path(recipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    target = load_model(recipe.target, max_len=64)  # unpacked: the drafter starts from it
    tok = target.tokenizer
    prompts = training_prompts(recipe.num_prompts + recipe.heldout_prompts, seed=recipe.seed)
    train_prompts, heldout = prompts[: recipe.num_prompts], prompts[recipe.num_prompts :]

    data_path = out / "data.pt"
    if data_path.exists():
        samples = load_samples(data_path)
    else:
        packed = load_for_inference(recipe.target, max_len=1024, num_slots=recipe.gen_batch).model
        temps = recipe.temperatures
        requests = [
            (tok.encode_chat([ChatMessage("user", p)]), temps[i % len(temps)])
            for i, p in enumerate(train_prompts)
        ]
        t = time.perf_counter()
        samples = generate_samples(
            packed,
            requests,
            max_new_tokens=recipe.max_new_tokens,
            stop_ids=tok.eos_token_ids,
            top_k=recipe.top_k,
            seed=recipe.seed,
        )
        n_tok = sum(len(s.output_ids) for s in samples)
        log.info("generated %d tokens in %.0f s", n_tok, time.perf_counter() - t)
        save_samples(samples, data_path)
        del packed

    vocab = None
    if recipe.draft_vocab:
        specials = [
            i
            for i in range(tok.vocab_size)
            if tok.backend.id_to_token(i) in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
        ]
        vocab = frequency_vocab(samples, recipe.draft_vocab, tok.eos_token_ids + specials)
    drafter = init_drafter(target.model, recipe.layers, vocab)
    full_to_draft = torch.full((target.model.config.vocab_size,), -1, dtype=torch.long)
    if vocab is None:
        full_to_draft = torch.arange(target.model.config.vocab_size)
    else:
        full_to_draft[vocab] = torch.arange(len(vocab))
    history = train(drafter, samples, full_to_draft, recipe.train, out / "checkpoint.pt")
    save_drafter(drafter, out / "drafter")

    record = evaluate(target, out / "drafter", heldout, recipe.gamma, recipe.max_new_tokens)
    record.update(
        train_tokens=sum(len(s.output_ids) for s in samples),
        train_sequences=len(samples),
        final_loss=sum(h["loss"] for h in history[-50:]) / min(50, len(history)),
        final_train_agreement=sum(h["agree"] for h in history[-50:]) / min(50, len(history)),
        coverage=_coverage(samples, full_to_draft),
        recipe=asdict(recipe),
    )
    (out / "drafter" / "training_record.json").write_text(json.dumps(record, indent=2))
    return record


def evaluate(
    target: LoadedModel, drafter_dir: Path, prompts: list[str], gamma: int, max_new_tokens: int
) -> dict:
    """Greedy SD with the saved drafter on held-out prompts: tau and acceptance."""
    tgt = load_for_inference(str(target.path), max_len=2048)
    model_drafter = build_drafter(str(drafter_dir), tgt, max_len=2048)
    costs = measure_costs(tgt.model, model_drafter, gamma)
    decoder = SpeculativeDecoder(tgt.model, model_drafter, gamma, tgt.tokenizer.eos_token_ids)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    per_prompt = []
    for p in prompts:
        ids = tgt.tokenizer.encode_chat([ChatMessage("user", p)])
        _, last = decoder.generate(ids, params)
        s = last.stats
        per_prompt.append(
            {
                "prompt": p,
                "new_tokens": s.new_tokens,
                "target_forwards": s.target_forwards,
                "draft_tokens": s.draft_tokens,
                "accepted_tokens": s.accepted_tokens,
            }
        )
    total = {
        k: sum(r[k] for r in per_prompt)
        for k in ("new_tokens", "target_forwards", "draft_tokens", "accepted_tokens")
    }
    return {
        "gamma": gamma,
        "max_new_tokens": max_new_tokens,
        "tokens_per_target_forward": total["new_tokens"] / total["target_forwards"],
        "acceptance_rate": total["accepted_tokens"] / max(1, total["draft_tokens"]),
        "new_tokens": total["new_tokens"],
        "target_step_ms": costs.t_step * 1e3,
        "draft_step_ms": costs.t_draft * 1e3,
        "draft_cost_ratio": costs.t_draft / costs.t_step,
        "heldout": per_prompt,
    }


def _coverage(samples, full_to_draft) -> float:
    outs = torch.tensor([t for s in samples for t in s.output_ids])
    return float((full_to_draft[outs] >= 0).float().mean())
