"""What the benchmarks' gRPC clients share: the request for a benchmark prompt, and the
retry hint of a refusal."""

from __future__ import annotations

import grpc

from distspec.v1 import speculative_decoding_pb2 as pb
from distspec.v1 import speculative_decoding_pb2_grpc as pb_grpc


def generate_stub(channel: grpc.Channel) -> pb_grpc.SpeculativeDecodingStub:
    return pb_grpc.SpeculativeDecodingStub(channel)


def chat_request(prompt: str, max_new_tokens: int, temperature: float = 0.0) -> pb.GenerateRequest:
    """A Generate request for one user message (the server applies the chat template)."""
    return pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content=prompt)],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
    )


def retry_after_s(error: grpc.RpcError) -> float | None:
    """The `retry-after-s` trailing metadata of a RESOURCE_EXHAUSTED refusal, if any."""
    trailing = getattr(error, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == "retry-after-s":
            try:
                return max(0.0, float(value))
            except ValueError:
                return None
    return None
