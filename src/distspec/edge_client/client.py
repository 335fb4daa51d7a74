"""The on-device side: a local drafter streaming drafts to the server's target over gRPC.

Stop-and-wait: draft k tokens, send them, wait for the verdict, repeat. Every round pays
draft + RTT + verify.

Overlap (../shared/design/algorithms.md section 3): the drafter drafts k + 1 tokens, sends the
first k and keeps the last as its guess of the server's bonus token; while the chunk is on
the wire it drafts the next chunk as if all k were accepted and the bonus is the guess. When
the verdict says exactly that, the next chunk goes out at once: a round costs
max(draft, RTT + verify) instead of the sum. Otherwise the prepared chunk is dropped and the
drafter drafts after the verified tokens.

Drafts are lossless over the wire: deterministic drafts (greedy, prompt lookup) send ids
only; sampled drafts are drawn from the drafter's top-k truncation, so the q each was drawn
from is sparse and is sent exactly.
"""

from __future__ import annotations

import dataclasses
import queue
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import torch

from distspec.spec.drafter import Draft, Drafter
from distspec.spec.sampling import SamplingParams
from distspec.v1 import speculative_decoding_pb2 as pb
from distspec.v1 import speculative_decoding_pb2_grpc as pb_grpc

DRAFT_TOP_K = 32  # sampled drafts come from the drafter's top-k: a sparse, exact q
FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_CANCELLED: "cancelled",
}


@dataclass
class EdgeStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    rounds: int = 0  # chunks verified
    draft_tokens: int = 0
    accepted_tokens: int = 0
    wall_s: float = 0.0
    time_to_first_token_s: float = 0.0
    rtt_ms: float = 0.0  # median time from sending a chunk to its verdict
    hidden_rtt_fraction: float = 0.0  # rounds whose next chunk was ready when the verdict came
    round_ms: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return self.new_tokens / (self.rounds + 1) if self.new_tokens else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("round_ms")
        d.update(
            tokens_per_s=self.tokens_per_s,
            tokens_per_target_forward=self.tokens_per_target_forward,
            acceptance_rate=self.acceptance_rate,
        )
        return d


@dataclass
class EdgeStep:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    stats: EdgeStats | None = None  # on the last step


class EdgeClient:
    def __init__(
        self,
        server: str,
        drafter: Drafter,
        gamma: int = 4,
        overlap: bool = True,
        timeout_s: float = 300.0,
    ):
        """server: "host:port"; drafter: any Drafter sharing the target's tokenizer."""
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        self.server, self.drafter, self.gamma = server, drafter, gamma
        self.overlap, self.timeout_s = overlap, timeout_s
        self._channel = grpc.insecure_channel(server)
        self._stub = pb_grpc.SpeculativeDecodingStub(self._channel)
        self._drafting = ThreadPoolExecutor(1, thread_name_prefix="edge-drafter")

    def close(self) -> None:
        self._channel.close()
        self._drafting.shutdown(wait=False)

    def generate(
        self,
        params: SamplingParams,
        prompt: str | None = None,
        messages: list[tuple[str, str]] | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> Iterator[EdgeStep]:
        """Stream the verified tokens: prompt (raw text), messages ((role, content); the
        server applies the chat template) or prompt_token_ids."""
        open_ = pb.OpenSession(
            prompt=prompt or "",
            messages=[pb.ChatMessage(role=r, content=c) for r, c in messages or []],
            prompt_token_ids=prompt_token_ids or [],
            sampling=_sampling_options(params),
        )
        requests: queue.Queue = queue.Queue()
        requests.put(pb.SpeculateRequest(open=open_))
        responses = self._stub.Speculate(iter(requests.get, None), timeout=self.timeout_s)
        try:
            yield from self._run(responses, requests, params)
        finally:
            requests.put(None)
            responses.cancel()

    def _run(self, responses, requests: queue.Queue, params: SamplingParams):
        t0 = time.perf_counter()
        opened = next(responses).opened
        verified = list(opened.prompt_token_ids)
        stats = EdgeStats(prompt_tokens=len(verified))
        max_k = min(self.gamma, opened.max_draft_tokens)
        draft_params = _draft_params(params)
        self.drafter.start(verified, draft_params)
        remaining = params.max_new_tokens
        prepared: Future | None = None  # (guess, next chunk) drafted while a chunk flies
        rtts, hidden = [], 0
        sent_at = time.perf_counter()
        chunk = Draft([])
        try:
            for response in responses:
                verdict = response.verdict
                now = time.perf_counter()
                if verdict.position != len(verified):
                    raise RuntimeError(
                        f"verdict at position {verdict.position}, expected {len(verified)}"
                    )
                new = list(verdict.token_ids)
                verified += new
                remaining -= len(new)
                stats.new_tokens += len(new)
                if stats.new_tokens == len(new):
                    stats.time_to_first_token_s = now - t0
                else:
                    stats.rounds += 1
                    stats.draft_tokens += len(chunk)
                    stats.accepted_tokens += verdict.num_accepted
                    rtts.append(now - sent_at)
                finish = FINISH.get(verdict.finish_reason)
                if finish:
                    stats.wall_s = time.perf_counter() - t0
                    stats.rtt_ms = 1000 * statistics.median(rtts) if rtts else 0.0
                    stats.hidden_rtt_fraction = hidden / stats.rounds if stats.rounds else 0.0
                    yield EdgeStep(new, verdict.text, finish, stats)
                    return
                yield EdgeStep(new, verdict.text)
                k = max(0, min(max_k, remaining - 1))
                ready = self._take(prepared, verdict, chunk, k)
                prepared = None
                if ready is not None:
                    hidden += 1
                    chunk = ready
                else:
                    chunk = self.drafter.propose(verified, k + 1) if k else Draft([])
                    chunk, guess = chunk[:k], chunk.tokens[k : k + 1]
                    if self.overlap and guess and k:
                        prepared = self._prepare(verified, chunk, guess[0], k)
                if ready is not None and self.overlap and k:
                    prepared = self._prepare_after_ready(verified, chunk, k)
                requests.put(pb.SpeculateRequest(draft=_chunk_message(len(verified), chunk)))
                sent_at = time.perf_counter()
        finally:
            self.drafter.finish()

    # -- overlap ---------------------------------------------------------------------------

    def _prepare(self, verified: list[int], chunk: Draft, guess: int, k: int) -> Future:
        """Draft the chunk after verified + chunk + guess, while chunk is verified."""
        context = verified + chunk.tokens + [guess]
        return self._drafting.submit(self._draft_with_guess, context, guess, k)

    def _prepare_after_ready(self, verified: list[int], chunk: Draft, k: int) -> Future:
        """The chunk just sent was prepared ahead: draft a new bonus guess and its successor."""
        context = verified + chunk.tokens

        def work():
            d = self.drafter.propose(context, k + 1)
            return (d.tokens[0], d[1:]) if len(d) > 1 else None

        return self._drafting.submit(work)

    def _draft_with_guess(self, context: list[int], guess: int, k: int):
        return guess, self.drafter.propose(context, k)

    def _take(self, prepared: Future | None, verdict, chunk: Draft, k: int) -> Draft | None:
        """The prepared chunk if the verdict is the one it was drafted for."""
        if prepared is None:
            return None
        result = prepared.result()
        if result is None:
            return None
        guess, ready = result
        all_accepted = verdict.num_accepted == len(chunk)
        if all_accepted and list(verdict.token_ids[-1:]) == [guess] and len(ready) >= k:
            return ready[:k]
        return None


def _draft_params(params: SamplingParams) -> SamplingParams:
    """What the drafter samples from: the request's temperature, top-p and a top-k truncation
    (so q is sparse and can travel exactly)."""
    if params.greedy:
        return params
    top_k = min(params.top_k, DRAFT_TOP_K) if params.top_k else DRAFT_TOP_K
    return dataclasses.replace(params, top_k=top_k)


def _sampling_options(params: SamplingParams) -> pb.SamplingOptions:
    options = pb.SamplingOptions(
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        stop_token_ids=params.stop_token_ids,
    )
    if params.seed is not None:
        options.seed = params.seed
    return options


def _chunk_message(position: int, draft: Draft) -> pb.DraftChunk:
    message = pb.DraftChunk(position=position, token_ids=draft.tokens)
    if draft.probs is not None:
        for row in draft.probs:
            ids = torch.nonzero(row > 0).flatten()
            message.q.append(pb.SparseDistribution(token_ids=ids.tolist(), probs=row[ids].tolist()))
    return message
