"""The things a benchmark compares: each turns (prompt ids, sampling) into generated ids."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from distspec.models.loader import LoadedModel, demo_gguf_path, resolve_model_dir
from distspec.spec_decode.decoding import SpeculativeDecoder
from distspec.spec_decode.drafters.model import ModelDrafter
from distspec.spec_decode.sampling import SamplingParams


@dataclass
class RunResult:
    token_ids: list[int]
    wall_s: float
    target_forwards: int | None = None
    draft_tokens: int | None = None
    accepted_tokens: int | None = None
    num_tokens: int | None = None  # default len(token_ids); llama.cpp's own count
    draft_s: float | None = None  # distspec: seconds drafting (in PEARL, alongside verifying)
    verify_s: float | None = None  # distspec: seconds in target forwards
    text: str | None = None  # the decoded output (what "same output" compares)
    ttft_s: float | None = None  # to the first token (the prompt's prefill): decoding is after
    cached_tokens: int | None = None  # distspec: prompt tokens its KV slot held (not prefilled)

    @property
    def tokens(self) -> int:
        return len(self.token_ids) if self.num_tokens is None else self.num_tokens


class Contender(ABC):
    name: str

    @abstractmethod
    def run(self, prompt_ids: list[int], params: SamplingParams) -> RunResult: ...

    def forget(self) -> None:
        """Drop what earlier runs taught it (a drafter's cross-request memory)."""
        return None


class DistspecContender(Contender):
    def __init__(self, name: str, decoder: SpeculativeDecoder, placement=None):
        """placement: a CpuPlacement whose target cores the runs take (its drafter is pinned
        already)."""
        self.name, self.decoder, self.placement = name, decoder, placement

    def use_prefix_cache(self, enabled: bool) -> None:
        """Whether prompts reuse what the KV slots (target's and drafter's) hold of them."""
        self.decoder.target.prefixes.enabled = enabled
        drafter = getattr(self.decoder.drafter, "inner", self.decoder.drafter)  # PinnedDrafter
        if isinstance(drafter, ModelDrafter):
            drafter.model.prefixes.enabled = enabled

    def forget(self) -> None:
        """Also what its KV slot holds: a repetition starts cold."""
        self.decoder.target.prefixes.hold(int(self.decoder.slot[0]), [])
        if self.decoder.drafter is not None:
            self.decoder.drafter.forget()

    def run(self, prompt_ids, params):
        with nullcontext() if self.placement is None else self.placement.on_target():
            ids, last = self.decoder.generate(prompt_ids, params)
        s = last.stats
        return RunResult(
            ids,
            s.wall_s,
            s.target_forwards,
            s.draft_tokens,
            s.accepted_tokens,
            draft_s=s.draft_s,
            verify_s=s.verify_s,
            ttft_s=s.time_to_first_token_s,
            cached_tokens=s.cached_tokens,
        )


class HFContender(Contender):
    """transformers' generate: plain autoregressive, or prompt lookup (lookup_tokens > 0)."""

    def __init__(self, name: str, model, eos_token_ids: list[int], lookup_tokens: int = 0):
        self.name, self.model, self.lookup = name, model, lookup_tokens
        self.eos = eos_token_ids

    def run(self, prompt_ids, params):
        ids = torch.tensor([prompt_ids])
        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.eos,
            pad_token_id=self.eos[0] if self.eos else None,
            attention_mask=torch.ones_like(ids),
        )
        if params.greedy:
            kwargs["do_sample"] = False
        else:
            kwargs.update(
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k or None,
            )
            torch.manual_seed(params.seed or 0)
        if self.lookup:
            kwargs["prompt_lookup_num_tokens"] = self.lookup
        t = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, **kwargs)
        wall = time.perf_counter() - t
        return RunResult(out[0, len(prompt_ids) :].tolist(), wall)


class LlamaCppContender(Contender):
    """llama.cpp (bench/llama_cpp.py) fed the same chat-templated prompt, as text."""

    def __init__(self, name: str, runner, tokenizer):
        self.name, self.runner, self.tokenizer = name, runner, tokenizer

    def run(self, prompt_ids, params):
        if not params.greedy:
            raise ValueError("llama.cpp contenders run greedy only (--temperature 0)")
        prompt = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        r = self.runner.run(prompt, params.max_new_tokens)
        # the speculative tool may overshoot -n by a draft: compare the first max_new_tokens
        ids = self.tokenizer.encode(r.text)[: params.max_new_tokens]
        text = self.tokenizer.decode(ids)
        return RunResult(
            [],
            r.wall_s,
            None,
            r.draft_tokens,
            r.accepted_tokens,
            r.num_tokens,
            text=text,
            ttft_s=r.prompt_s,
        )


def load_hf_model(target: str):
    """The target in transformers, loaded the way its users would (GGUF or HF directory)."""
    from transformers import AutoModelForCausalLM

    if target == "demo":
        gguf = demo_gguf_path()
        src, kw = str(gguf.parent), {"gguf_file": gguf.name}
    else:
        src, kw = str(resolve_model_dir(target)), {}
    return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw).eval()


def distspec_decoder(
    target: LoadedModel,
    drafter,
    gamma: int,
    adaptive: bool,
    mode: str = "sd",
    trees=False,
    slot: int = 0,
):
    from distspec.engine import make_decoder

    mode = "ar" if drafter is None else mode
    return make_decoder(target, drafter, gamma, adaptive, mode, trees=trees, slot=slot)
