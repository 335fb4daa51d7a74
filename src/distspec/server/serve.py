"""`distspec serve`: the runtime behind the gRPC server (and the OpenAI-compatible HTTP API),
until SIGTERM or SIGINT."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distspec.cluster.ray_cluster import ClusterConfig
from distspec.models.loader import WEIGHT_DTYPES, check_activations
from distspec.scheduler.runtime import Runtime, RuntimeConfig
from distspec.scheduler.scheduler import SchedulerConfig
from distspec.server.security import ClientLimits, TlsConfig, read_tokens
from distspec.workers.drafter import DrafterSpec
from distspec.workers.target import TargetSpec

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    port: int = 50051
    host: str = "[::]"
    address: str | None = None  # Ray cluster to join; None: start a local one
    use_ray: bool = True
    target: str = "demo"
    target_tp: int = 1
    drafter: str | None = "demo"  # demo | ngram | PATH | None (plain decoding)
    drafter_tp: int = 1  # ranks of each drafter group
    drafter_parallel: str = "tensor"  # how they split it: tensor | layer (EasySpec)
    easyspec_group: int = 0  # EasySpec: fuzzy groups of this many drafter layers (0: off)
    easyspec_exact: tuple[int, int] = (1, 1)  # EasySpec: first and last drafter layers exact
    num_drafters: int = 1
    lookup: bool = True
    tree_width: int = 1  # > 1: token trees of up to this many children per node
    mode: str | None = None  # default: auto with a drafter, ar without
    gamma: int = 4
    num_slots: int = 16
    max_len: int = 2048
    max_waiting: int = 16
    decode_steps: int = 4  # plain rounds: tokens a session decodes per target call
    prefix_cache: bool = True  # a prompt reuses what its KV slot holds of it
    device: str = "cpu"
    dtype: str = "float32"
    target_dtype: str = "fp32"  # the target's weights: fp32 (in dtype) | int8 | int4
    target_activations: str = "fp32"  # what a quantized target multiplies: fp32 | int8
    cpus_per_rank: float = 1.0
    target_cpus: float | None = None  # per target rank; default: see ClusterConfig
    drafter_cpus: float | None = None  # per drafter rank; default: cpus_per_rank
    threads: int | None = None  # torch threads per worker (default: one per CPU of its bundle)
    metrics_port: int | None = None
    http_port: int | None = None  # the OpenAI-compatible HTTP API (0: a free port)
    served_model_name: str | None = None  # the model id of the HTTP API (default: target)
    tls_cert: str | None = None  # with tls_key: serve TLS
    tls_key: str | None = None
    tls_client_ca: str | None = None  # mutual TLS: clients need a certificate from this CA
    tokens_file: str | None = None  # bearer tokens, one per line: required when set
    max_sessions_per_client: int = 0  # 0: no limit
    requests_per_minute: float = 0  # new sessions per client per minute; 0: no limit
    resume_timeout_s: float = 30.0  # a broken Speculate stream's session waits this long
    request_timeout_s: float = 0.0  # a request still running this long is ended (0: no limit)
    stall_timeout_s: float = 60.0  # the longest the server waits on a client's I/O (0: none)
    # on SIGTERM: requests in flight get this long to finish; new ones are refused at once
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.target_dtype not in WEIGHT_DTYPES:
            raise ValueError(
                f"target_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {self.target_dtype!r}"
            )
        check_activations(self.target_activations)
        if self.tree_width < 1:
            raise ValueError(f"tree_width must be >= 1, got {self.tree_width}")
        if self.decode_steps < 1:
            raise ValueError(f"decode_steps must be >= 1, got {self.decode_steps}")
        if self.drafter == "recycle":
            raise ValueError(
                "drafter recycle learns from the target's logits beside a local target "
                "(distspec generate, bench): the server's drafters do not see them"
            )
        for name in ("request_timeout_s", "stall_timeout_s", "drain_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: no limit), got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ServeConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(
                f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        return cls(**values)

    def runtime_config(self) -> RuntimeConfig:
        drafter = None if self.drafter in (None, "", "none") else self.drafter
        mode = self.mode or ("auto" if drafter else "ar")
        target = TargetSpec(
            self.target,
            self.num_slots,
            self.max_len,
            self.device,
            self.dtype,
            self.threads,
            self.target_dtype,
            self.target_activations,
            prefix_cache=self.prefix_cache,
        )
        drafter_spec = None
        if drafter:
            drafter_spec = DrafterSpec(
                drafter,
                self.target,
                self.num_slots,
                self.max_len,
                self.lookup,
                self.device,
                self.dtype,
                self.threads,
                self.drafter_parallel,
                self.easyspec_group,
                tuple(self.easyspec_exact),
                tree_width=self.tree_width,
                prefix_cache=self.prefix_cache,
            )
        cluster = ClusterConfig(
            target=target,
            target_tp=self.target_tp,
            drafter=drafter_spec,
            drafter_tp=self.drafter_tp,
            num_drafters=self.num_drafters,
            address=self.address,
            cpus_per_rank=self.cpus_per_rank,
            target_cpus=self.target_cpus,
            drafter_cpus=self.drafter_cpus,
        )
        scheduler = SchedulerConfig(
            mode=mode,
            gamma=self.gamma,
            max_waiting=self.max_waiting,
            trees=self.tree_width > 1,
            decode_steps=self.decode_steps,
        )
        return RuntimeConfig(cluster, scheduler, use_ray=self.use_ray)


def serve(config: ServeConfig) -> None:
    from distspec.server.gateway import Gateway
    from distspec.server.grpc_server import GrpcServer

    if bool(config.tls_cert) != bool(config.tls_key):
        raise ValueError("TLS needs both tls_cert and tls_key")
    tls = (
        TlsConfig(config.tls_cert, config.tls_key, config.tls_client_ca)
        if config.tls_cert
        else None
    )
    tokens = read_tokens(config.tokens_file) if config.tokens_file else None
    limits = ClientLimits(config.max_sessions_per_client, config.requests_per_minute)
    runtime = Runtime(config.runtime_config())
    # unwound in reverse: the gRPC server stops, then the HTTP API, then the runtime
    with contextlib.ExitStack() as stack:
        stack.callback(runtime.close)
        # one engine, two front doors: limits and timeouts span both
        gateway = Gateway(runtime, limits, config.request_timeout_s, config.stall_timeout_s)
        server = GrpcServer(
            runtime, config.port, config.host, tls, tokens, limits, config.resume_timeout_s, gateway
        )
        http = None
        if config.http_port is not None:
            from distspec.server.http_api import HttpServer

            model = config.served_model_name or config.target
            http = HttpServer(gateway, config.http_port, config.host, model, tokens, tls)
        if config.metrics_port is not None:
            from distspec.scheduler.metrics import start_metrics_server

            start_metrics_server(runtime, config.metrics_port)
        if http is not None:
            http_port = http.start()
            stack.callback(http.stop)
        port = server.start()
        stack.callback(server.stop)
        # The handler takes no lock: setting an Event there deadlocks if the signal lands
        # while the main thread holds the Event's own lock, and an untimed wait never wakes
        # for a signal the kernel hands to another thread. The main thread polls instead.
        signals: list[int] = []

        def on_signal(sig: int, _frame: Any) -> None:  # the first drains, a second ends it
            signals.append(sig)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        mode = runtime.config.scheduler.mode
        print(f"distspec: placement: {runtime.placement()}", file=sys.stderr, flush=True)
        print(f"distspec: serving {config.target} ({mode}) on {config.host}:{port}", flush=True)
        if http is not None:
            scheme = "https" if tls else "http"
            print(
                f"distspec: OpenAI-compatible HTTP API ({http.api.model}) on "
                f"{scheme}://{config.host}:{http_port}/v1",
                flush=True,
            )
        while not signals:
            time.sleep(0.1)
        runtime.scheduler.stop_admitting()  # new requests: UNAVAILABLE / 503 from now on
        server.drain()
        if http is not None:
            http.drain()
        _drain(runtime.scheduler, config.drain_timeout_s, lambda: len(signals) > 1)


def _drain(scheduler, timeout_s: float, stop_now: Callable[[], bool]) -> None:
    """Wait up to timeout_s for the sessions in flight to end (they keep streaming), then end
    the rest with UNAVAILABLE and a message saying why."""
    open_ = sum(scheduler.load())
    print(
        f"distspec: shutting down: {open_} request(s) in flight get up to {timeout_s:g} s",
        file=sys.stderr,
        flush=True,
    )
    deadline = time.monotonic() + timeout_s
    while sum(scheduler.load()) and time.monotonic() < deadline and not stop_now():
        time.sleep(0.05)
    left = sum(scheduler.load())
    why = (
        "a second signal ended the drain"
        if stop_now()
        else f"not done within the drain timeout ({timeout_s:g} s)"
    )
    ended = f", {left} ended ({why})" if left else ""
    print(f"distspec: drained: {open_ - left} finished{ended}", file=sys.stderr, flush=True)
    scheduler.close(f"the server shut down before the request finished: {why}; retry it")
