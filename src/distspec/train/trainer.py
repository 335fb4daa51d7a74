"""Distillation of the drafter: KL to the target's top-k distribution on its own generations.

Loss per output position: cross-entropy between the target's top-k probabilities
(renormalised) and the drafter's softmax over its draft vocabulary, which is the KL up to a
constant; target tokens outside the draft vocabulary cannot be drafted and are dropped.
Checkpoints hold model, optimiser, step and RNG state, so a run resumes where it stopped.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from distspec.models.llama import Transformer
from distspec.train.datagen import Sample

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 1200
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.0
    max_seq_len: int = 384
    seed: int = 0
    checkpoint_every: int = 200


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T] inputs (prompt + output, right-padded)
    positions: torch.Tensor  # [N] flat indices into B*T whose next token is an output token
    target_idx: torch.Tensor  # [N, K] draft-vocabulary indices of the target's top-k (-1: none)
    target_p: torch.Tensor  # [N, K] target probabilities (renormalised over the top-k)


def make_batch(samples: list[Sample], full_to_draft: torch.Tensor, max_len: int) -> Batch:
    seqs = [(s.prompt_ids + s.output_ids)[:max_len] for s in samples]
    width = max(len(x) for x in seqs)
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    positions, idx, probs = [], [], []
    for b, (s, seq) in enumerate(zip(samples, seqs, strict=True)):
        tokens[b, : len(seq)] = torch.tensor(seq)
        start = len(s.prompt_ids) - 1  # logits at this position predict output token 0
        n = min(len(s.output_ids), len(seq) - start)
        if n <= 0:
            continue
        positions.append(b * width + start + torch.arange(n))
        idx.append(full_to_draft[s.topk_ids[:n].long()])
        probs.append(s.topk_logprobs[:n].float().exp())
    target_idx = torch.cat(idx)
    target_p = torch.cat(probs) * (target_idx >= 0)
    target_p = target_p / target_p.sum(-1, keepdim=True).clamp_min(1e-9)
    return Batch(tokens, torch.cat(positions), target_idx, target_p)


def distill_loss(model: Transformer, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, top-1 agreement with the target's most likely token)."""
    hidden = model.forward_uncached(batch.tokens)
    h = hidden.reshape(-1, hidden.shape[-1])[batch.positions]
    logq = torch.log_softmax(model.head_logits(h).float(), -1)
    gathered = logq.gather(1, batch.target_idx.clamp_min(0))
    loss = -(batch.target_p * gathered).sum(-1).mean()
    agree = (logq.argmax(-1) == batch.target_idx[:, 0]).float().mean()
    return loss, agree


def train(
    model: Transformer,
    train_samples: list[Sample],
    full_to_draft: torch.Tensor,
    config: TrainConfig,
    checkpoint: Path,
    progress: bool = True,
    stop_at: int | None = None,
) -> list[dict]:
    """Train in place; resume from `checkpoint` if it exists. Returns the loss log.

    stop_at: leave after this step (checkpointed), e.g. to split a long run across sessions;
    the schedule is always that of config.steps."""
    torch.manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config))
    step, history = 0, []
    rng = random.Random(config.seed)
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, history = state["step"], state["history"]
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        log.info("resumed from %s at step %d", checkpoint, step)
    order = sorted(range(len(train_samples)), key=lambda i: len(train_samples[i].output_ids))
    buckets = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    model.train()
    bar = tqdm(total=config.steps, initial=step, desc="training", unit="step", disable=not progress)
    last = min(config.steps, stop_at or config.steps)
    while step < last:
        batch = make_batch(
            [train_samples[i] for i in rng.choice(buckets)], full_to_draft, config.max_seq_len
        )
        loss, agree = distill_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        history.append({"step": step, "loss": loss.item(), "agree": agree.item()})
        recent = history[-50:]
        bar.set_postfix(
            loss=f"{sum(h['loss'] for h in recent) / len(recent):.3f}",
            agree=f"{sum(h['agree'] for h in recent) / len(recent):.3f}",
        )
        bar.update()
        if step % config.checkpoint_every == 0 or step == last:
            _save(checkpoint, model, opt, sched, step, history, rng, config)
    bar.close()
    model.eval()
    return history


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _save(path: Path, model, opt, sched, step, history, rng, config) -> None:
    trainable = {k: v for k, v in model.state_dict().items() if not k.startswith("embed.")}
    state = {
        "model": trainable,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "step": step,
        "history": history,
        "rng": rng.getstate(),
        "torch_rng": torch.get_rng_state(),
        "config": asdict(config),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
