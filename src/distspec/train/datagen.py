"""Distillation data: the target's own generations, with its top-k log-probabilities.

Generation is continuously batched: every cache slot holds one sequence, all active slots
decode together in one forward (each at its own position), and a finished sequence's slot is
refilled with the next prompt at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from tqdm import tqdm

from distspec.models.llama import Transformer
from distspec.spec_decode.sampling import SamplingParams, draw, probs_from_logits


@dataclass
class Sample:
    prompt_ids: list[int]
    output_ids: list[int]
    topk_ids: torch.Tensor  # [len(output_ids), K] int32: target's top-k before each output token
    topk_logprobs: torch.Tensor  # [len(output_ids), K] float16 (temperature 1)
    temperature: float


@dataclass
class _Row:
    request: int
    prompt_ids: list[int]
    params: SamplingParams
    output: list[int]
    topk_ids: list[torch.Tensor]
    topk_lp: list[torch.Tensor]


def generate_samples(
    model: Transformer,
    requests: list[tuple[list[int], float]],
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    top_k: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> list[Sample]:
    """requests: (prompt ids, temperature) pairs; temperature 0 = greedy. Uses every cache slot
    of model (setup_cache(num_slots=batch, ...)). Returns samples in request order."""
    queue = deque(enumerate(requests))
    rows: dict[int, _Row] = {}  # slot -> row
    free = list(range(model.num_slots))
    done: dict[int, Sample] = {}
    stops = set(stop_ids)
    bar = tqdm(total=len(requests), desc="generating", unit="seq", disable=not progress)

    def record(row: _Row, logits: torch.Tensor) -> bool:
        """Append the next token chosen from logits; True when the row is finished."""
        lp = torch.log_softmax(logits.float(), -1)
        top = torch.topk(lp, top_k)
        row.topk_ids.append(top.indices.to(torch.int32))
        row.topk_lp.append(top.values.half())
        if row.params.greedy:
            tok = int(logits.argmax())
        else:
            pos = len(row.prompt_ids) + len(row.output)
            tok = int(draw(probs_from_logits(logits, row.params), row.params.seed, pos)[0])
        row.output.append(tok)
        return tok in stops or len(row.output) >= max_new_tokens

    def finish(slot: int) -> None:
        row = rows.pop(slot)
        done[row.request] = Sample(
            row.prompt_ids,
            row.output,
            torch.stack(row.topk_ids),
            torch.stack(row.topk_lp),
            row.params.temperature,
        )
        free.append(slot)
        bar.update()

    with torch.inference_mode():
        while queue or rows:
            while free and queue:  # refill free slots: prefill each new prompt in its slot
                i, (prompt, temperature) = queue.popleft()
                slot = free.pop()
                params = SamplingParams(
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    seed=seed * 1_000_003 + i,
                )
                rows[slot] = row = _Row(i, prompt, params, [], [], [])
                logits = model(
                    torch.tensor([prompt]),
                    torch.arange(len(prompt))[None],
                    torch.tensor([slot]),
                    last=1,
                )[0, -1]
                if record(row, logits):
                    finish(slot)
            if not rows:
                continue
            slots = sorted(rows)
            tokens = torch.tensor([[rows[s].output[-1]] for s in slots])
            pos = torch.tensor([[len(rows[s].prompt_ids) + len(rows[s].output) - 1] for s in slots])
            logits = model(tokens, pos, torch.tensor(slots))[:, 0]
            for j, s in enumerate(slots):
                if record(rows[s], logits[j]):
                    finish(s)
    bar.close()
    return [done[i] for i in range(len(requests))]


def save_samples(samples: list[Sample], path) -> None:
    torch.save([s.__dict__ for s in samples], path)


def load_samples(path) -> list[Sample]:
    return [Sample(**d) for d in torch.load(path, weights_only=True)]
