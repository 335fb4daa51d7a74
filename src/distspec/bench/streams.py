"""What the load generators share: one streaming Generate read to its end with the arrival
time of every chunk, and the latency figures taken from those times."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from distspec.bench.grpc_client import retry_after_s
from distspec.v1 import speculative_decoding_pb2 as pb

OnChunk = Callable[[float, int], None]


@dataclass
class Streamed:
    """One request as its client saw it (times: time.monotonic())."""

    sent: float
    ended: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens)
    # of the final message (finish_reason set): None when none came
    finish_reason: int | None = None
    code: grpc.StatusCode | None = None  # the status it ended with; None: OK
    details: str = ""
    retry_after_s: float | None = None  # a refusal's hint

    @property
    def ttft_s(self) -> float | None:
        return self.chunks[0][0] - self.sent if self.chunks else None

    def itl_s(self) -> list[tuple[float, float]]:
        """(arrival, gap) per token after the first chunk: a chunk of k tokens arriving dt
        after the previous one counts k gaps of dt / k."""
        gaps = []
        for (previous, _), (t, n) in zip(self.chunks, self.chunks[1:], strict=False):
            gaps += [(t, (t - previous) / n)] * n
        return gaps


def add_chunk(result: Streamed, token_ids, on_chunk: OnChunk | None = None) -> None:
    """Record the tokens of a response that just arrived (empty ones are not chunks);
    on_chunk(arrival, tokens) sees each chunk as it comes."""
    if token_ids:
        now = time.monotonic()
        result.chunks.append((now, len(token_ids)))
        result.token_ids += token_ids
        if on_chunk is not None:
            on_chunk(now, len(token_ids))


def stream_generate(
    stub, request: pb.GenerateRequest, timeout_s: float, on_chunk: OnChunk | None = None
) -> Streamed:
    """Send a streaming Generate and read it to its end; a status other than OK is kept in
    the result (code, details, the retry hint of a refusal), not raised. on_chunk: see
    add_chunk."""
    result = Streamed(sent=time.monotonic())
    try:
        for response in stub.Generate(request, timeout=timeout_s):
            add_chunk(result, list(response.token_ids), on_chunk)
            if response.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                result.finish_reason = response.finish_reason
    except grpc.RpcError as e:
        result.code, result.details = e.code(), e.details() or ""
        result.retry_after_s = retry_after_s(e)
    result.ended = time.monotonic()
    return result


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor
