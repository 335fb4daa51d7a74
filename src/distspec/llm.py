"""`LLM`: offline generation for many prompts at once, batched by the scheduler the server
uses (continuous batching over KV slots, speculative rounds), with workers in this process or
on Ray. Load once, then call generate (raw prompts) or chat (the model's chat template)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from distspec.cluster.ray_cluster import ClusterConfig
from distspec.models.tokenizer import ChatMessage
from distspec.scheduler.runtime import Runtime, RuntimeConfig
from distspec.scheduler.scheduler import SchedulerConfig
from distspec.spec_decode.decoding import GenerationStats
from distspec.spec_decode.sampling import SamplingParams
from distspec.workers.drafter import DrafterSpec
from distspec.workers.target import TargetSpec

OFFLINE_QUEUE = 1 << 30  # offline, every prompt waits its turn: nobody is refused


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    text: str  # the new tokens, decoded
    token_ids: list[int]  # the new tokens (EOS included when generation stopped on it)
    finish_reason: str  # stop | length
    stats: GenerationStats


class LLM:
    def __init__(
        self,
        target: str = "demo",
        drafter: str | None = "demo",
        *,
        mode: str | None = None,
        gamma: int = 4,
        num_slots: int = 8,
        max_len: int = 2048,
        lookup: bool = True,
        use_ray: bool = False,
        target_tp: int = 1,
        address: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        target_dtype: str = "fp32",
        target_activations: str = "fp32",
        threads: int | None = None,
    ):
        """target and drafter as in `distspec generate` (demo, ngram, a path; drafter None:
        plain decoding); mode ar | sd | pearl | auto (default: sd with a drafter, else ar);
        num_slots: sessions decoded together; use_ray: workers as Ray actors (target_tp
        ranks; address: a running cluster), else in this process."""
        mode = mode or ("sd" if drafter else "ar")
        target_spec = TargetSpec(
            target, num_slots, max_len, device, dtype, threads, target_dtype, target_activations
        )
        drafter_spec = None
        if drafter:
            drafter_spec = DrafterSpec(
                drafter, target, num_slots, max_len, lookup, device, dtype, threads
            )
        cluster = ClusterConfig(target_spec, target_tp, drafter_spec, address=address)
        scheduler = SchedulerConfig(mode=mode, gamma=gamma, max_waiting=OFFLINE_QUEUE)
        self.runtime = Runtime(RuntimeConfig(cluster, scheduler, use_ray=use_ray))
        self.tokenizer = self.runtime.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Raw prompts (no chat template), one output each, in order."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self._run([self.tokenizer.encode(p) for p in prompts], params)

    def chat(
        self,
        conversations: Sequence[dict] | Sequence[Sequence[dict]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One conversation ([{"role": ..., "content": ...}, ...]) or several, through the
        model's chat template; one reply each, in order."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        ids = [
            self.tokenizer.encode_chat([ChatMessage(m["role"], m["content"]) for m in c])
            for c in conversations
        ]
        return self._run(ids, params)

    def _run(
        self, prompt_ids: list[list[int]], params: SamplingParams | Sequence | None
    ) -> list[RequestOutput]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompt_ids)
        if len(params) != len(prompt_ids):
            raise ValueError(f"{len(params)} sampling params for {len(prompt_ids)} prompts")
        scheduler = self.runtime.scheduler
        # all queued at once: the scheduler batches them over its KV slots
        sessions = [
            scheduler.submit(ids, dataclasses.replace(p))
            for ids, p in zip(prompt_ids, params, strict=True)
        ]
        outputs = []
        try:
            for ids, session in zip(prompt_ids, sessions, strict=True):
                steps = list(session.stream())
                new = [t for step in steps for t in step.token_ids]
                last = steps[-1]
                text = self.tokenizer.decode(new)
                outputs.append(RequestOutput(ids, text, new, last.finish_reason, last.stats))
        finally:  # a failed request (or Ctrl-C) ends the others too
            for session in sessions[len(outputs) :]:
                scheduler.cancel(session.id)
        return outputs

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
