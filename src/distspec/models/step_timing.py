"""Wall time of single-token decode steps, for the drafter workers' start-up measurements and
the harnesses' timing tables."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from distspec.models.llama import Transformer


def decode_step_times(
    model: Transformer,
    context_len: int,
    steps: int,
    fuzzy_groups: tuple[tuple[int, int], ...] = (),
    around: Callable[[], AbstractContextManager] = nullcontext,
) -> list[float]:
    """Seconds of each of `steps` single-token forwards (fuzzy_groups: EasySpec's) after
    context_len random tokens, in KV slot 0; around(): entered outside each timed step."""
    n = context_len + steps
    device = model.device
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (1, n), generator=generator).to(device)
    pos, slot = torch.arange(n, device=device)[None], torch.tensor([0], device=device)
    model(tokens[:, :context_len], pos[:, :context_len], slot, last=1)
    times = []
    for i in range(context_len, n):
        with around():
            start = time.perf_counter()
            model(tokens[:, i : i + 1], pos[:, i : i + 1], slot, True, fuzzy_groups=fuzzy_groups)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return times
