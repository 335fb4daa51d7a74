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

from distspec.datasets import load_prompts
from distspec.models.loader import LoadedModel, load_for_inference, load_model
from distspec.models.tokenizer import ChatMessage
from distspec.spec_decode.decoding import SpeculativeDecoder
from distspec.spec_decode.draft_policy import measure_costs
from distspec.spec_decode.drafters.factory import build_drafter
from distspec.spec_decode.sampling import SamplingParams
from distspec.train.datagen import Sample, generate_samples, load_samples, save_samples
from distspec.train.draft_model import frequency_vocab, init_drafter, save_drafter
from distspec.train.prompts import derived_prompts, training_prompts
from distspec.train.self_instruct import generate_queries
from distspec.train.trainer import TrainConfig, train

log = logging.getLogger(__name__)


@dataclass
class DrafterRecipe:
    target: str = "demo"
    out_dir: str = "drafter-run"
    # Prompt families (see train/prompts.py and train/self_instruct.py); each keeps
    # `heldout_prompts` of its own prompts out of training for the evaluation.
    num_prompts: int = 3600  # from templates
    self_instruct_prompts: int = 2000  # user requests written by the target itself
    derived_prompts: int = 2000  # requests about paragraphs/code of earlier answers
    heldout_prompts: int = 8
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
    data = _DataStages(recipe, tok, out)
    held = recipe.heldout_prompts

    prompts = training_prompts(recipe.num_prompts + held, seed=recipe.seed)
    samples = data.answers("templates", prompts[: recipe.num_prompts])
    heldout = prompts[recipe.num_prompts :]
    if recipe.self_instruct_prompts:
        queries = data.queries(recipe.self_instruct_prompts + held)
        samples += data.answers("self-instruct", queries[: recipe.self_instruct_prompts])
        heldout += queries[recipe.self_instruct_prompts :]
    if recipe.derived_prompts:
        sources = [tok.decode(s.output_ids) for s in samples]
        derived = derived_prompts(sources, recipe.derived_prompts + held, seed=recipe.seed)
        samples += data.answers("derived", derived[: recipe.derived_prompts])
        heldout += derived[recipe.derived_prompts :]
    data.close()

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
    """Greedy SD with the saved drafter alone (no prompt lookup) on held-out prompts: tau and
    acceptance."""
    tgt = load_for_inference(str(target.path), max_len=2048)
    model_drafter = build_drafter(str(drafter_dir), tgt, max_len=2048, lookup=False)
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
        "lookup": False,
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


_OTHER_RECIPE = "the run directory was made with another recipe; use a new --out"


class _DataStages:
    """The generated data, one file per stage, each reused when present (resumable)."""

    def __init__(self, recipe: DrafterRecipe, tok, out: Path):
        self.recipe, self.tok, self.out = recipe, tok, out
        self._packed = None
        self.exclude = set(load_prompts(None, None))  # never train on benchmark prompts

    @property
    def model(self):
        if self._packed is None:
            r = self.recipe
            self._packed = load_for_inference(r.target, max_len=1024, num_slots=r.gen_batch).model
        return self._packed

    def queries(self, n: int) -> list[str]:
        path = self.out / "queries.json"
        if not path.exists():
            queries = generate_queries(
                self.model, self.tok, n, seed=self.recipe.seed, exclude=self.exclude
            )
            path.write_text(json.dumps(queries, indent=1))
        queries = json.loads(path.read_text())
        if len(queries) != n:
            raise ValueError(f"{path} holds {len(queries)} requests, not {n}: {_OTHER_RECIPE}")
        return queries

    def answers(self, stage: str, prompts: list[str]) -> list[Sample]:
        r = self.recipe
        prompts = [p for p in prompts if p not in self.exclude]
        temps = r.temperatures
        requests = [
            (self.tok.encode_chat([ChatMessage("user", p)]), temps[i % len(temps)])
            for i, p in enumerate(prompts)
        ]
        path = self.out / f"data-{stage}.pt"
        if path.exists():
            samples = load_samples(path)
            if [(s.prompt_ids, s.temperature) for s in samples] != requests:
                raise ValueError(f"{path} answers other prompts: {_OTHER_RECIPE}")
            return samples
        t = time.perf_counter()
        log.info("stage %s: answering %d prompts", stage, len(prompts))
        samples = generate_samples(
            self.model,
            requests,
            max_new_tokens=r.max_new_tokens,
            stop_ids=self.tok.eos_token_ids,
            top_k=r.top_k,
            seed=r.seed,
        )
        n_tok = sum(len(s.output_ids) for s in samples)
        log.info("stage %s: %d tokens in %.0f s", stage, n_tok, time.perf_counter() - t)
        save_samples(samples, path)
        return samples

    def close(self) -> None:
        self._packed = None
