"""The OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions (whole answers or
server-sent events), /v1/models and /health, on the same Gateway (so the same scheduler,
bearer tokens and per-client limits) as the gRPC server. Starlette on uvicorn, in a thread of
the serve process.

Errors are OpenAI's body {"error": {message, type, param, code}}: 400 for a bad request, 401
without a known bearer token (when the server has tokens), 404 for an unknown model, 408 when
the body does not arrive within the stall timeout, 429 when the scheduler or the client's
limits refuse (with Retry-After when the scheduler gives a hint), 503 while shutting down,
504 past the server's request timeout (a stream that has begun ends with an error event
instead). A client that disconnects cancels its session, which frees its KV slot at the end
of the current round; one that stops reading for the stall timeout is disconnected."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from distspec.scheduler.scheduler import AdmissionError, ShuttingDownError
from distspec.scheduler.session import Session, SessionError
from distspec.server.gateway import (
    ClientLimitError,
    Gateway,
    InvalidRequest,
    RequestTimeoutError,
    StalledError,
)
from distspec.server.openai_protocol import (
    CompletionRequest,
    Reply,
    StopStrings,
    error_body,
    parse_request,
    usage,
)
from distspec.server.security import TlsConfig, client_token

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 << 20
FINISH = {"stop": "stop", "length": "length", "cancelled": "abort"}
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies must not buffer the stream
]


class ClientStalled(Exception):
    """The client took no part of the answer for the stall timeout."""


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(str(self), self.type, self.param, self.code)


def api_error(e: BaseException) -> ApiError:
    """What the client is told about an exception (never a traceback)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, InvalidRequest):
        return ApiError(400, str(e), param=e.param)
    if isinstance(e, AdmissionError):
        retry = {
            "Retry-After": str(max(1, math.ceil(e.retry_after_s))),
            "retry-after-ms": str(int(e.retry_after_s * 1000)),
        }
        message = f"{e}; retry in {e.retry_after_s:g} s"
        return ApiError(429, message, "rate_limit_error", code="rate_limit_exceeded", headers=retry)
    if isinstance(e, ClientLimitError):
        return ApiError(429, str(e), "rate_limit_error", code="rate_limit_exceeded")
    if isinstance(e, ShuttingDownError | StalledError):
        return ApiError(503, str(e), "server_error", code="service_unavailable")
    if isinstance(e, RequestTimeoutError):
        # 504, not 408: the request arrived in time, the answer took longer than allowed
        return ApiError(504, str(e), "server_error", code="request_timeout")
    if isinstance(e, SessionError):
        return ApiError(500, str(e), "server_error")
    log.error("HTTP API: unexpected error", exc_info=e)
    return ApiError(500, "internal server error", "server_error")


def error_response(e: BaseException) -> JSONResponse:
    err = api_error(e)
    return JSONResponse(err.body(), err.status, headers=err.headers)


class HttpApi:
    """The Starlette app over one Gateway."""

    def __init__(
        self,
        gateway: Gateway,
        model: str,
        tokens: set[str] | None = None,
        pool: ThreadPoolExecutor | None = None,
    ):
        """model: the id served (and accepted in requests); tokens: bearer tokens /v1
        requires; pool: threads that wait on sessions (one per open request)."""
        self.gateway = gateway
        self.model = model
        self.tokens = tokens
        self.pool = pool or ThreadPoolExecutor(thread_name_prefix="http-api")
        self.created = int(time.time())
        self.draining = False  # shutting down: new requests get 503
        self.app = Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model_info, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            ],
            exception_handlers={HTTPException: self._http_error, Exception: self._server_error},
        )

    # -- routes ----------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if self.draining:
            return JSONResponse({"status": "shutting down"}, 503)
        return JSONResponse({"status": "serving"})

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as e:
            return error_response(e)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model_info(self, request: Request) -> Response:
        try:
            self._authorize(request)
            self._check_model(request.path_params["model"])
        except ApiError as e:
            return error_response(e)
        return JSONResponse(self._model_card())

    async def completions(self, request: Request):
        return await self._complete(request, chat=False)

    async def chat_completions(self, request: Request):
        return await self._complete(request, chat=True)

    # -- a completion ----------------------------------------------------------------------

    async def _complete(self, request: Request, chat: bool):
        try:
            self._authorize(request)
            if self.draining:
                raise ShuttingDownError("the server is shutting down")
            req = parse_request(await self._read_json(request), chat)
            self._check_model(req.model)
            client = _client_id(request)
            loop = asyncio.get_running_loop()
            session, prompt_tokens = await loop.run_in_executor(
                self.pool, self._submit, client, req
            )
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening
        except Exception as e:
            return error_response(e)
        return _Answer(self, session, client, req, prompt_tokens)

    def _submit(self, client: str, req: CompletionRequest) -> tuple[Session, int]:
        """Tokenise, check, and queue the request (blocking work, off the event loop)."""
        g = self.gateway
        param = "messages" if req.chat else "prompt"
        try:
            if req.chat:
                ids = g.chat_ids(req.messages)
            elif isinstance(req.prompt, str):
                ids = g.tokenizer.encode(req.prompt)
            else:
                ids = list(req.prompt)
        except InvalidRequest:
            raise
        except ValueError as e:  # the chat template refused the messages
            raise InvalidRequest(str(e), param) from None
        max_tokens = req.max_tokens
        if max_tokens is None:  # chat: as long as the context allows
            max_tokens = g.runtime.info.max_len
        params = g.sampling(
            max_new_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=req.seed,
            stop_token_ids=req.stop_token_ids,
            max_new_tokens_name=req.max_tokens_param,
        )
        try:
            return g.submit(client, ids, params), len(ids)
        except ValueError as e:  # the prompt: empty, too long, ids outside the vocabulary
            raise InvalidRequest(str(e), param) from None

    # -- helpers ---------------------------------------------------------------------------

    async def _read_json(self, request: Request) -> Any:
        stall_s = self.gateway.stall_timeout_s or None
        try:
            async with asyncio.timeout(stall_s):
                return await _read_body_json(request)
        except TimeoutError:
            raise ApiError(
                408, f"the request body did not arrive within {stall_s:g} s", code="timeout"
            ) from None

    def _authorize(self, request: Request) -> None:
        if self.tokens and client_token(request.headers.items()) not in self.tokens:
            raise ApiError(
                401,
                "missing or unknown bearer token",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model!r}",
                param="model",
                code="model_not_found",
            )

    def _model_card(self) -> dict:
        card = {"id": self.model, "object": "model", "created": self.created}
        return card | {"owned_by": "distspec"}

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = "not_found" if exc.status_code == 404 else None
        err = ApiError(exc.status_code, exc.detail, code=code, headers=exc.headers)
        return JSONResponse(err.body(), err.status, headers=err.headers)

    async def _server_error(self, request: Request, exc: Exception) -> Response:
        return error_response(exc)


class _Answer:
    """The ASGI response to an admitted request: one JSON body, or server-sent events. However
    it ends (finished, the client gone, an error, shutdown), its session is cancelled and
    its client's count released."""

    def __init__(
        self, api: HttpApi, session: Session, client: str, req: CompletionRequest, prompt: int
    ):
        self.api, self.session, self.client, self.req = api, session, client, req
        self.prompt_tokens = prompt
        self.completion_tokens = 0
        self.reply = Reply(req.chat, api.model)

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.ensure_future(self._watch(receive))
        stall_s = self.api.gateway.stall_timeout_s or None

        async def bounded_send(message) -> None:
            try:  # (not wait_for: a task of its own would not run once shutdown cancels all)
                async with asyncio.timeout(stall_s):
                    await send(message)
            except TimeoutError:
                raise ClientStalled from None

        try:
            if self.req.stream:
                await self._stream(bounded_send)
            else:
                await self._whole(scope, bounded_send)
        except ClientStalled:
            # nothing more can reach it: returning with the answer unfinished makes uvicorn
            # close the connection
            log.warning("HTTP API: the client took no data for %g s; disconnecting", stall_s)
        finally:
            watcher.cancel()
            self.api.gateway.scheduler.cancel(self.session.id)
            self.api.gateway.release(self.client)

    async def _watch(self, receive) -> None:
        """Cancel the session as soon as the client disconnects."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.api.gateway.scheduler.cancel(self.session.id)

    async def _events(self):
        """(text, finish_reason) as the session goes; finish_reason only on the last."""
        deltas = self.api.gateway.deltas(self.session, per_token=bool(self.req.stop))
        stops = StopStrings(self.req.stop)
        loop = asyncio.get_running_loop()
        while True:
            delta = await loop.run_in_executor(self.api.pool, next, deltas, None)
            if delta is None:  # the stream ended before a last step (a resumed reader)
                raise StalledError("the session ended without an answer")
            self.completion_tokens += len(delta.token_ids)
            final = delta.finish_reason is not None
            text, stopped = stops.push(delta.text, final=final)
            if stopped:
                self.api.gateway.scheduler.cancel(self.session.id)
                yield text, "stop"
                return
            yield text, FINISH.get(delta.finish_reason) if final else None
            if final:
                return

    def _usage(self) -> dict:
        return usage(self.prompt_tokens, self.completion_tokens, self.session.stats.cached_tokens)

    async def _whole(self, scope, send) -> None:
        texts, finish = [], ["stop"]
        try:
            async for text, reason in self._events():
                texts.append(text)
                finish.append(reason)
        except (Exception, asyncio.CancelledError) as e:
            await error_response(_shutdown_if_cancelled(e))(scope, _no_receive, send)
            return
        body = self.reply.full("".join(texts), finish[-1], self._usage())
        await JSONResponse(body)(scope, _no_receive, send)

    async def _stream(self, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})

        async def event(data: Any) -> None:
            text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
            body = f"data: {text}\n\n".encode()
            await send({"type": "http.response.body", "body": body, "more_body": True})

        usage_key = self.req.include_usage
        chunk = self.reply.chunk
        try:
            if self.req.chat:
                await event(chunk("", first=True, usage_key=usage_key))
            async for text, finish in self._events():
                if text:
                    await event(chunk(text, usage_key=usage_key))
                if finish is not None:
                    await event(chunk("", finish, usage_key=usage_key))
            if usage_key:
                await event(self.reply.usage_chunk(self._usage()))
        except (Exception, asyncio.CancelledError) as e:
            if isinstance(e, ClientStalled):
                raise
            await event(api_error(_shutdown_if_cancelled(e)).body())
        await event("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _shutdown_if_cancelled(e: BaseException) -> BaseException:
    """uvicorn cancels the requests still open when its shutdown grace runs out: they are told
    so (503 or a last error event) rather than cut off."""
    if isinstance(e, asyncio.CancelledError):
        return ShuttingDownError("the server shut down before the answer was complete")
    return e


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}


async def _read_body_json(request: Request) -> Any:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:
        raise InvalidRequest(f"the request body is not valid JSON: {e}") from None


def _client_id(request: Request) -> str:
    """As security.client_id names gRPC clients: the bearer token, else the peer's host."""
    token = client_token(request.headers.items())
    if token:
        return f"token:{token}"
    host = request.client.host if request.client else "unknown"
    return "peer:" + (f"ipv6:[{host}]" if ":" in host else f"ipv4:{host}")


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket; "::" (or "[::]", gRPC's spelling) takes IPv4 too where it can."""
    host = host.strip("[]")
    if host == "::":
        try:
            return socket.create_server(
                (host, port), family=socket.AF_INET6, dualstack_ipv6=socket.has_dualstack_ipv6()
            )
        except OSError:  # no IPv6 here
            host = "0.0.0.0"
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return socket.create_server((host, port), family=family[0][0])


class HttpServer:
    """HttpApi on a port, served by uvicorn in a background thread."""

    def __init__(
        self,
        gateway: Gateway,
        port: int = 0,
        host: str = "[::]",
        model: str = "distspec",
        tokens: set[str] | None = None,
        tls: TlsConfig | None = None,
        grace_s: float = 5.0,
    ):
        """model: the id /v1/models lists; tokens: bearer tokens /v1 requires; tls: serve
        HTTPS (clients need a certificate when it has a client CA); grace_s: how long
        stop() lets open requests finish before it cancels them."""
        runtime = gateway.runtime
        waiters = runtime.info.num_slots + runtime.config.scheduler.max_waiting + 8
        self.pool = ThreadPoolExecutor(max_workers=waiters, thread_name_prefix="http-api")
        self.api = HttpApi(gateway, model, tokens, self.pool)
        self.grace_s = grace_s
        tls_options: dict[str, Any] = {}
        if tls is not None:
            tls_options = dict(ssl_certfile=tls.cert, ssl_keyfile=tls.key)
            if tls.client_ca:
                tls_options |= dict(ssl_ca_certs=tls.client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(
            self.api.app,
            http="h11",
            ws="none",
            lifespan="off",
            loop="asyncio",
            log_config=None,  # leave the process's logging as it is
            access_log=False,
            timeout_graceful_shutdown=grace_s,
            **tls_options,
        )
        config.load()  # bad TLS files fail here, not in the thread
        self._server = uvicorn.Server(config)
        self._socket = _listen(host, port)
        self.port = self._socket.getsockname()[1]
        self._thread = threading.Thread(
            target=self._server.run, args=([self._socket],), name="http-api", daemon=True
        )

    def start(self, timeout_s: float = 30.0) -> int:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the HTTP API did not start on port {self.port}")
            time.sleep(0.01)
        return self.port

    def drain(self) -> None:
        """New requests get 503 (and /health says so); open ones go on."""
        self.api.draining = True

    def stop(self) -> None:
        """Stop listening, let open requests finish for grace_s, cancel what is left."""
        self.drain()
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=self.grace_s + 10)
        self._socket.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
