"""What both front doors (gRPC, the OpenAI-compatible HTTP API) share: prompt and sampling
validation, admission (per-client limits, then the scheduler's), the server's time limits and
a session's output as token ids with their text. One Gateway per runtime, so per-client
limits span both doors."""

from __future__ import annotations

import hashlib
import math
import queue
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from distspec.models.tokenizer import ChatMessage, StreamDecoder, Tokenizer
from distspec.scheduler.runtime import Runtime
from distspec.scheduler.session import Session
from distspec.server.security import ClientLedger, ClientLimits
from distspec.server.watchdog import Watchdog
from distspec.spec_decode.decoding import GenerationStats
from distspec.spec_decode.sampling import SamplingParams

DEFAULT_MAX_NEW_TOKENS = 128
ROLES = ("system", "user", "assistant")
STEP_TIMEOUT_S = 300.0  # a session that makes no progress this long has lost its workers
STALL_TIMEOUT_S = 60.0  # default: the longest the server waits on a client's own I/O
MAX_SEED = 2**63  # what every client's integers hold (JSON numbers in int64, proto uint64)


class InvalidRequest(ValueError):
    """A bad request field; param names it where one field is at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ClientLimitError(RuntimeError):
    """The client is over its own limits (ClientLimits), whatever the server's load."""


class StalledError(RuntimeError):
    """The session made no progress for STEP_TIMEOUT_S; it has been cancelled."""


class RequestTimeoutError(RuntimeError):
    """The request ran past the server's request_timeout_s; its session has been cancelled."""


class Message(Protocol):
    role: str
    content: str


@dataclass
class Delta:
    """New tokens of a session and the text they complete; the last one has finish_reason
    (and stats) set."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    stats: GenerationStats | None = None


class Gateway:
    def __init__(
        self,
        runtime: Runtime,
        limits: ClientLimits | None = None,
        request_timeout_s: float = 0.0,
        stall_timeout_s: float = STALL_TIMEOUT_S,
    ):
        """request_timeout_s: a session still running this long after it was submitted
        (waiting for a slot included) is cancelled, and its request ends with a timeout
        (0: no limit); stall_timeout_s: the longest either door waits on a client's own
        I/O: a request message or body to arrive, a response to be taken (0: no limit)."""
        if request_timeout_s < 0 or stall_timeout_s < 0:
            raise ValueError("timeouts must be >= 0 (0: no limit)")
        self.runtime = runtime
        self.scheduler = runtime.scheduler
        self.tokenizer: Tokenizer = runtime.tokenizer
        self.ledger = ClientLedger(limits or ClientLimits())
        self.request_timeout_s = request_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.watchdog = Watchdog("gateway-timers")

    # -- validation ------------------------------------------------------------------------

    def prompt_ids(self, prompt: str, messages: Sequence[Message]) -> list[int]:
        """Raw text or chat messages, exactly one of them."""
        if bool(prompt) == bool(messages):
            raise InvalidRequest("give exactly one of prompt and messages")
        if prompt:
            return self.tokenizer.encode(prompt)
        return self.chat_ids(messages)

    def chat_ids(self, messages: Sequence[Message], param: str = "messages") -> list[int]:
        """The messages through the model's chat template, ready for the reply."""
        if not messages:
            raise InvalidRequest(f"{param} is empty", param)
        chat = []
        for i, m in enumerate(messages):
            if m.role not in ROLES:
                raise InvalidRequest(
                    f"{param}[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r}",
                    f"{param}[{i}].role",
                )
            if not m.content:
                raise InvalidRequest(f"{param}[{i}].content is empty", f"{param}[{i}].content")
            chat.append(ChatMessage(m.role, m.content))
        return self.tokenizer.encode_chat(chat)

    def sampling(
        self,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
        max_new_tokens_name: str = "max_new_tokens",
    ) -> SamplingParams:
        """SamplingParams from optional fields (None: the default); max_new_tokens_name is
        the field's name in the caller's protocol, for the error messages."""
        max_new = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        if max_new < 1:
            raise InvalidRequest(f"{max_new_tokens_name} must be >= 1", max_new_tokens_name)
        temperature = 0.0 if temperature is None else temperature
        if not math.isfinite(temperature) or temperature < 0:
            raise InvalidRequest(
                f"temperature must be a finite number >= 0, got {temperature}", "temperature"
            )
        top_p = 1.0 if top_p is None else top_p
        if not (0 < top_p <= 1):
            raise InvalidRequest(f"top_p must be in (0, 1], got {top_p}", "top_p")
        top_k = 0 if top_k is None else top_k
        if top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0: off), got {top_k}", "top_k")
        if seed is not None and not 0 <= seed < MAX_SEED:
            raise InvalidRequest(f"seed must be in [0, 2**63), got {seed}", "seed")
        vocab = self.runtime.info.vocab_size
        bad = [t for t in stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(
                f"stop_token_ids: {bad[0]} is outside the vocabulary", "stop_token_ids"
            )
        return SamplingParams(
            max_new_tokens=max_new,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop_token_ids=list(stop_token_ids),
        )

    # -- admission and output ----------------------------------------------------------------

    def submit(
        self,
        client: str,
        prompt_ids: list[int],
        params: SamplingParams,
        external: bool = False,
        keep_decoding: bool = False,
    ) -> Session:
        """A new session counted against the client's limits (give it back with release()
        when the request ends). Raises ClientLimitError, and from Scheduler.submit
        AdmissionError (full), ShuttingDownError, ValueError (a bad prompt)."""
        refused = self.ledger.admit(client)
        if refused:
            raise ClientLimitError(refused)
        try:
            session = self.scheduler.submit(
                prompt_ids, params, external, keep_decoding, tenant=tenant_of(client)
            )
        except BaseException:
            self.ledger.release(client)
            raise
        if self.request_timeout_s > 0:
            ref = weakref.ref(session)  # the alarm must not keep a finished session's tokens
            ended = lambda: (s := ref()) is None or s.finished  # noqa: E731
            self.watchdog.after(self.request_timeout_s, lambda: self._time_out(ref()), ended)
        return session

    def _time_out(self, session: Session | None) -> None:
        if session is not None and not session.finished:
            session.timed_out = True
            self.scheduler.cancel(session.id)

    def release(self, client: str) -> None:
        self.ledger.release(client)

    def deltas(
        self, session: Session, per_token: bool = False, timeout_s: float = STEP_TIMEOUT_S
    ) -> Iterator[Delta]:
        """The session's output until its last step; per_token: one Delta per token (to
        find where a stop string ends). Raises SessionError or ShuttingDownError when the
        server fails it, StalledError (after cancelling it) when it stops making progress,
        RequestTimeoutError when it ran past request_timeout_s."""
        decoder = StreamDecoder(self.tokenizer)
        try:
            for step in session.stream(timeout_s=timeout_s):
                if step.finish_reason == "cancelled" and session.timed_out:
                    raise RequestTimeoutError(self.timeout_message())
                final = step.finish_reason is not None
                split = per_token and len(step.token_ids) > 1
                pieces = [[t] for t in step.token_ids] if split else [step.token_ids]
                for i, ids in enumerate(pieces):
                    last = i == len(pieces) - 1
                    yield Delta(
                        ids,
                        decoder.push(ids, final=final and last),
                        step.finish_reason if last else None,
                        step.stats if last else None,
                    )
        except queue.Empty:
            self.scheduler.cancel(session.id)
            raise StalledError("generation stalled on the server") from None

    def timeout_message(self) -> str:
        return f"the request ran past the server's limit of {self.request_timeout_s:g} s"


def tenant_of(client: str) -> str:
    """The tenant a client's sessions draft for (suffix decoding's outputs are shared within
    one, never across): a digest of its identity (bearer token, else peer host), so no
    token travels to the workers."""
    return hashlib.sha256(client.encode()).hexdigest()[:16]
