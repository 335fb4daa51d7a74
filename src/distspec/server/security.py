"""Who may call the server, over what, and how much: TLS, bearer tokens, per-client limits."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import grpc

SERVICE_PREFIX = "/distspec.v1.SpeculativeDecoding/"  # health and reflection stay open


@dataclass
class TlsConfig:
    cert: str  # server certificate chain (PEM)
    key: str  # its private key (PEM)
    client_ca: str | None = None  # set: mutual TLS, clients need a certificate it signed

    def credentials(self) -> grpc.ServerCredentials:
        ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        pair = (Path(self.key).read_bytes(), Path(self.cert).read_bytes())
        return grpc.ssl_server_credentials(
            [pair], root_certificates=ca, require_client_auth=ca is not None
        )


@dataclass
class ClientLimits:
    max_sessions: int = 0  # open sessions per client (0: no limit)
    requests_per_minute: float = 0  # new sessions per client per minute (0: no limit)


def read_tokens(path: str) -> set[str]:
    """One token per line; blank lines and # comments ignored."""
    tokens = set()
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            tokens.add(line)
    if not tokens:
        raise ValueError(f"{path} holds no tokens")
    return tokens


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED for distspec calls without `authorization: Bearer <known token>`."""

    def __init__(self, tokens: set[str]):
        self.tokens = tokens

    def intercept_service(self, continuation, details):
        if not details.method.startswith(SERVICE_PREFIX):
            return continuation(details)
        if client_token(details.invocation_metadata) in self.tokens:
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None

        def deny(requests, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")

        # request-streaming whatever the method: refused before any request message is read
        # (grpc would wait for a unary one first, as long as the client likes)
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        return grpc.stream_unary_rpc_method_handler(deny)


def client_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


def client_id(context: grpc.ServicerContext) -> str:
    """Who is calling: the bearer token when there is one, else the peer's address (host)."""
    token = client_token(context.invocation_metadata())
    if token:
        return f"token:{token}"
    peer = context.peer()  # "ipv4:127.0.0.1:5555" / "ipv6:[::1]:5555"
    return "peer:" + peer.rsplit(":", 1)[0]


@dataclass
class ClientLedger:
    """Open sessions and recent session starts per client; refuses what goes over limits."""

    limits: ClientLimits
    _open: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _starts: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self, client: str) -> str | None:
        """None if the client may open a session (counted), else the reason it may not."""
        with self._lock:
            now = time.monotonic()
            if self.limits.requests_per_minute:
                recent = [t for t in self._starts[client] if now - t < 60]
                self._starts[client] = recent
                if len(recent) >= self.limits.requests_per_minute:
                    return f"rate limit: {self.limits.requests_per_minute:g} sessions per minute"
            if self.limits.max_sessions and self._open[client] >= self.limits.max_sessions:
                return f"session limit: {self.limits.max_sessions} open sessions per client"
            self._open[client] += 1
            self._starts[client].append(now)
            return None

    def open_sessions(self, client: str) -> int:
        with self._lock:
            return self._open[client]

    def release(self, client: str) -> None:
        with self._lock:
            self._open[client] = max(0, self._open[client] - 1)
