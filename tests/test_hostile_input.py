"""Hostile input, property-based: random and malformed gRPC messages (random field values,
raw bytes, invalid UTF-8), Speculate chunks at wrong positions, misuse of session ids, random
and malformed HTTP requests, and bearer tokens on every RPC and route. Every bad request
gets a clear status (gRPC: never UNKNOWN or INTERNAL; HTTP: 4xx with an OpenAI error body,
never 5xx), and afterwards the server still serves the exact greedy output with nothing
leaked (sessions, KV slots, client counts, threads)."""

from __future__ import annotations

import json
import queue
import threading
import time

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from distspec.server.grpc_server import GrpcServer
from distspec.server.http_api import MAX_BODY_BYTES, HttpServer
from distspec.v1 import speculative_decoding_pb2 as pb
from distspec.v1 import speculative_decoding_pb2_grpc as pb_grpc
from hostile_strategies import (
    bad_utf8,
    completion_bodies,
    draft_chunks,
    field,
    generate_requests,
    open_sessions,
)
from served import (
    BAD_GRPC_CODES,
    SERVICE,
    assert_serving,
    expected,
    http_request,
    serve_tiny,
    wait_all_free,
)

C = grpc.StatusCode
REFUSED = {C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED}  # RESOURCE_EXHAUSTED: full, or > 4 MiB
TOKENS = {"good", "other"}


def fuzz(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(scope="module")
def served(tiny_dir):
    # a long resume window: streams that end must not leave a thread each behind for it
    with serve_tiny(tiny_dir, slots=2, max_waiting=2, resume_timeout_s=30.0) as s:
        yield s


@pytest.fixture(scope="module")
def threads_before(served, target) -> int:
    assert_serving(served, target)  # (the pools have started a few threads)
    return threading.active_count()


def assert_unharmed(served, target, threads_before: int, metadata=()) -> None:
    wait_all_free(served)
    assert_serving(served, target, metadata)
    wait_all_free(served)
    # the pools of the doors (two sets: the plain and the guarded ones), and a few more
    assert threading.active_count() <= threads_before + 2 * served.pool_threads() + 4


def identity(x: bytes) -> bytes:
    return x


def raw(channel: grpc.Channel, method: str, streaming_in: bool, streaming_out: bool):
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[streaming_in, streaming_out]
    return kind(method, request_serializer=identity, response_deserializer=identity)


def status_of(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        result = call(*args, **kwargs)
        if not isinstance(result, bytes):
            for _ in result:
                pass
    except grpc.RpcError as e:
        return e.code()
    return C.OK


# ---------------------------------------------------------------------------------------------
# gRPC


@fuzz(150)
@given(request=generate_requests())
def test_random_generate_requests(served, request):
    call = served.stub.Generate(request, timeout=30)
    try:
        first = next(call)
        assert len(first.token_ids) >= 1 or first.finish_reason
        call.cancel()  # (a client that leaves, too)
        event("served")
    except grpc.RpcError as e:
        assert e.code() in REFUSED, (e.code(), e.details())
        event(f"{e.code().name}: {e.details()[:24]}")
    except StopIteration:
        pytest.fail("a stream with no response")


@fuzz(100)
@given(data=st.binary(max_size=64), method=st.sampled_from(["Generate", "Speculate"]))
def test_random_bytes_as_the_request(served, data, method):
    if method == "Generate":
        code = status_of(raw(served.channel, SERVICE + method, False, True), data, timeout=30)
        assert code in REFUSED | {C.OK}, code
    else:
        # bytes that happen to open a good stop-and-wait session would wait for chunks that
        # never come: the client's deadline ends those (and frees the session at once)
        rpc = raw(served.channel, SERVICE + method, True, True)
        code = status_of(rpc, iter([data]), timeout=5)
        assert code in REFUSED | {C.OK, C.NOT_FOUND, C.DEADLINE_EXCEEDED}, code
    assert code not in BAD_GRPC_CODES
    event(f"{method}: {code.name}")


@fuzz(60)
@given(
    bad=bad_utf8,
    where=st.sampled_from(["prompt", "role", "content", "open.prompt", "open.content", "resume"]),
)
def test_invalid_utf8_in_string_fields(served, bad, where):
    """Python protobuf will not build these; raw bytes carry them."""
    if where.startswith("open.") or where == "resume":
        inner = {
            "open.prompt": field(1, bad),
            "open.content": field(2, field(1, b"user") + field(2, bad)),
            "resume": field(6, b"1") + field(7, bad),
        }[where]
        rpc = raw(served.channel, SERVICE + "Speculate", True, True)
        call = rpc(iter([field(1, inner)]), timeout=30)
    else:
        message = {
            "prompt": field(1, bad),
            "role": field(2, field(1, bad) + field(2, b"hi")),
            "content": field(2, field(1, b"user") + field(2, bad)),
        }[where]
        call = raw(served.channel, SERVICE + "Generate", False, True)(message, timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:
            pass
    assert err.value.code() == C.INVALID_ARGUMENT, err.value.details()
    assert "does not parse" in err.value.details()


@fuzz(150)
@given(open_=open_sessions(), chunks=st.lists(draft_chunks(), min_size=1, max_size=2))
def test_random_speculate_sessions_and_chunks(served, open_, chunks):
    """Random opens, then random chunks (wrong positions, ids outside the vocabulary, bad
    q); a session that survives them is driven to its end with empty chunks."""
    requests: queue.Queue = queue.Queue()
    requests.put(pb.SpeculateRequest(open=open_))
    call = served.stub.Speculate(iter(requests.get, None), timeout=30)
    try:
        try:
            opened = next(call).opened
        except grpc.RpcError as e:
            assert e.code() in REFUSED | {C.NOT_FOUND}, (e.code(), e.details())
            event(f"open refused: {e.code().name}")
            return
        prompt = verified = len(opened.prompt_token_ids)
        for response in call:
            verdict = response.verdict
            verified = verdict.position + len(verdict.token_ids)
            if verdict.finish_reason:
                event("finished")
                return
            if open_.keep_decoding and not chunks:
                continue
            # the drawn chunks, then empty ones: a plain step each
            chunk = chunks.pop(0)(verified, prompt) if chunks else pb.DraftChunk(position=verified)
            requests.put(pb.SpeculateRequest(draft=chunk))
        pytest.fail("the stream ended without a finish reason")
    except grpc.RpcError as e:
        assert e.code() == C.INVALID_ARGUMENT, (e.code(), e.details())
        event(f"chunk refused: {e.details()[:24]}")
    finally:
        requests.put(None)
        call.cancel()  # (a test that failed midway must not leave its session waiting)


@pytest.mark.parametrize(
    "tokens, message",
    [([10**6], "outside the vocabulary"), ([1] * 20_000, "at most 8")],
    ids=["outside-vocabulary", "huge-chunk"],
)
def test_chunks_that_hung_or_overloaded_the_server(served, tokens, message):
    """Once: a token outside the vocabulary killed the chunk reader (the stream hung until the
    idle timeout); a chunk of 20000 sampled tokens became 20000 vocabulary-sized rows."""
    requests: queue.Queue = queue.Queue()
    requests.put(pb.SpeculateRequest(open=pb.OpenSession(prompt="Hello")))
    call = served.stub.Speculate(iter(requests.get, None), timeout=30)
    opened = next(call).opened
    verified = len(opened.prompt_token_ids) + len(next(call).verdict.token_ids)
    t0 = time.monotonic()
    requests.put(pb.SpeculateRequest(draft=pb.DraftChunk(position=verified, token_ids=tokens)))
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:
            pass
    requests.put(None)
    assert err.value.code() == C.INVALID_ARGUMENT and message in err.value.details()
    assert time.monotonic() - t0 < 5  # at once, not at the idle timeout
    wait_all_free(served)


def test_gprc_faults_left_the_server_unharmed(served, target, threads_before):
    assert_unharmed(served, target, threads_before)


def test_ended_speculate_streams_leave_no_thread_behind(served, target, threads_before):
    """Each ended stream's session stays resumable for resume_timeout_s (30 s here), on the
    gateway's one timer thread, not on a thread of its own."""
    wait_all_free(served)
    before = threading.active_count()
    for _ in range(30):
        sampling = pb.SamplingOptions(max_new_tokens=3)
        open_ = pb.OpenSession(prompt="abc", sampling=sampling, keep_decoding=True)
        stream = Stream(served.channel, open_)
        assert stream.status() == C.OK
    wait_all_free(served)
    assert threading.active_count() <= before + 5


# ---------------------------------------------------------------------------------------------
# session ids: someone else's, wrong secrets, two streams at once


@pytest.fixture(scope="module")
def guarded(served):
    """Doors with bearer tokens on the same runtime."""
    grpc_server = GrpcServer(
        served.runtime, host="127.0.0.1", tokens=TOKENS, resume_timeout_s=30, gateway=served.gateway
    )
    http_server = HttpServer(served.gateway, host="127.0.0.1", model="tiny", tokens=TOKENS)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_server.start()}")
    http_server.start()
    yield channel, grpc_server, http_server
    channel.close()
    http_server.stop()
    grpc_server.stop(grace_s=1)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


class Stream:
    """A Speculate call whose requests are sent one at a time."""

    def __init__(self, channel, open_: pb.OpenSession, metadata=()):
        self.requests: queue.Queue = queue.Queue()
        self.requests.put(pb.SpeculateRequest(open=open_))
        stub = pb_grpc.SpeculativeDecodingStub(channel)
        self.call = stub.Speculate(iter(self.requests.get, None), timeout=30, metadata=metadata)

    def send(self, position: int, tokens=()) -> None:
        chunk = pb.DraftChunk(position=position, token_ids=list(tokens))
        self.requests.put(pb.SpeculateRequest(draft=chunk))

    def status(self) -> grpc.StatusCode:
        try:
            for _ in self.call:
                pass
        except grpc.RpcError as e:
            return e.code()
        finally:
            self.requests.put(None)
        return C.OK


def resume(opened: pb.SessionOpened, position: int, **changes) -> pb.OpenSession:
    open_ = pb.OpenSession(
        resume_session_id=opened.session_id,
        resume_secret=opened.resume_secret,
        resume_position=position,
    )
    for name, value in changes.items():
        setattr(open_, name, value)
    return open_


def test_resuming_with_wrong_ids_secrets_or_clients(served, target, guarded, threads_before):
    channel = guarded[0]
    owned = pb.OpenSession(prompt="Hello", sampling=pb.SamplingOptions(max_new_tokens=6))
    owner = Stream(channel, owned, bearer("good"))
    opened = next(owner.call).opened
    out = list(next(owner.call).verdict.token_ids)  # the first token
    at = len(opened.prompt_token_ids)
    for open_, metadata, code in [
        (resume(opened, at, resume_secret="guess"), bearer("good"), C.NOT_FOUND),
        (resume(opened, at, resume_secret=""), bearer("good"), C.NOT_FOUND),
        (resume(opened, at, resume_secret="é" * 32), bearer("good"), C.NOT_FOUND),  # was UNKNOWN
        (resume(opened, at, resume_session_id="999"), bearer("good"), C.NOT_FOUND),
        (resume(opened, at), bearer("other"), C.NOT_FOUND),  # someone else's session
        (resume(opened, at), bearer("wrong"), C.UNAUTHENTICATED),
        (resume(opened, at - 1), bearer("good"), C.INVALID_ARGUMENT),  # inside the prompt
        (resume(opened, 10**6), bearer("good"), C.INVALID_ARGUMENT),  # past the verified
    ]:
        assert Stream(channel, open_, metadata).status() == code, open_
    # the owner's session is unharmed: it goes on to the exact greedy output
    want = expected(target, list(opened.prompt_token_ids), 6)
    owner.send(at + len(out), want[len(out) : len(out) + 4])
    for response in owner.call:
        out += response.verdict.token_ids
        if response.verdict.finish_reason:
            break
        owner.send(at + len(out), want[len(out) : len(out) + 4])
    owner.requests.put(None)
    assert out == want
    assert_unharmed(served, target, threads_before)


def test_two_streams_resuming_one_session_at_once(served, target, threads_before):
    """The newest stream takes the session over; the streams it replaced end with
    FAILED_PRECONDITION (and do not resume it again), and the output is exactly greedy."""
    sampling = pb.SamplingOptions(max_new_tokens=20)
    original = Stream(served.channel, pb.OpenSession(prompt="Hello", sampling=sampling))
    opened = next(original.call).opened
    first = next(original.call).verdict.token_ids  # stop and wait: nothing more without chunks
    at = len(opened.prompt_token_ids) + len(first)
    resumers = [Stream(served.channel, resume(opened, at)) for _ in range(2)]
    barrier = threading.Barrier(2)
    catch_up: dict[int, list] = {}

    def attach(i: int) -> None:
        barrier.wait()
        catch_up[i] = [next(resumers[i].call), next(resumers[i].call)]  # opened, a verdict

    workers = [threading.Thread(target=attach, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    assert original.status() == C.FAILED_PRECONDITION
    codes = {}
    winner = None
    for i, r in enumerate(resumers):  # the one that attached first was replaced
        r.send(at)
        try:
            response = next(r.call)
            winner, out = r, list(first) + list(response.verdict.token_ids)
        except grpc.RpcError as e:
            codes[i] = e.code()
    assert list(codes.values()) == [C.FAILED_PRECONDITION] and winner is not None
    want = expected(target, list(opened.prompt_token_ids), 20)
    while True:
        winner.send(len(opened.prompt_token_ids) + len(out), want[len(out) : len(out) + 4])
        verdict = next(winner.call).verdict
        out += verdict.token_ids
        if verdict.finish_reason:
            break
    winner.requests.put(None)
    assert out == want
    assert_unharmed(served, target, threads_before)


# ---------------------------------------------------------------------------------------------
# bearer tokens on every RPC and every route


def test_every_rpc_needs_a_token(guarded, served):
    """Every method of every service the server exposes (found by reflection, so a new one is
    covered), but health checking and reflection, which stay open for probes."""
    channel = guarded[0]
    database = ProtoReflectionDescriptorDatabase(channel)
    pool = DescriptorPool(database)
    open_services = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    services = set(database.get_services())
    assert open_services < services and "distspec.v1.SpeculativeDecoding" in services
    methods = [
        m for name in sorted(services - open_services) for m in pool.FindServiceByName(name).methods
    ]
    assert {m.name for m in methods} >= {"Generate", "Speculate"}
    for method in methods:
        path = f"/{method.containing_service.full_name}/{method.name}"
        rpc = raw(channel, path, method.client_streaming, method.server_streaming)

        streaming = method.client_streaming

        def empty_request(streaming=streaming):  # an empty message
            return iter([b""]) if streaming else b""

        for metadata in ([], bearer("wrong"), [("authorization", "good")], bearer("")):
            code = status_of(rpc, empty_request(), timeout=10, metadata=metadata)
            assert code == C.UNAUTHENTICATED, (path, metadata, code)
        code = status_of(rpc, empty_request(), timeout=10, metadata=bearer("good"))
        assert code == C.INVALID_ARGUMENT, (path, code)  # past the check
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    wait_all_free(served)


def test_every_route_needs_a_token(guarded, served):
    http_server = guarded[2]
    port = http_server.port
    routes = [r for r in http_server.api.app.routes if r.path != "/health"]  # open: probes
    assert {r.path for r in routes} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    good = {"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    for route in routes:
        path = route.path.replace("{model:path}", "tiny")
        for method in sorted(route.methods):
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "good"}):
                status, body = http_request(served, method, path, good, headers, port)
                assert status == 401, (method, path, headers, body)
                if method != "HEAD":
                    assert json.loads(body)["error"]["code"] == "invalid_api_key"
            good_token = {"authorization": "Bearer good"}
            status, body = http_request(served, method, path, good, good_token, port)
            assert status == 200, (method, path, body)
    assert http_request(served, "GET", "/health", port=port)[0] == 200
    wait_all_free(served)


# ---------------------------------------------------------------------------------------------
# HTTP


def assert_clear_http_answer(status: int, body: bytes, method: str = "POST") -> None:
    assert status < 500, (status, body[:300])
    if status >= 400 and method != "HEAD":
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    elif status == 200 and body.startswith(b"data: "):  # a stream: events, then [DONE]
        events = [e.removeprefix(b"data: ") for e in body.strip().split(b"\n\n")]
        assert events[-1] == b"[DONE]"
        for event in events[:-1]:
            assert "error" not in json.loads(event), event


@fuzz(150)
@given(data=st.data(), chat=st.booleans())
def test_random_json_bodies(served, data, chat):
    body = data.draw(completion_bodies(chat))
    path = "/v1/chat/completions" if chat else "/v1/completions"
    data = json.dumps(body).encode()  # NaN and Infinity as Python writes them
    status, reply = http_request(served, "POST", path, data)
    assert_clear_http_answer(status, reply)
    event(str(status) + (" stream" if reply.startswith(b"data: ") else ""))


valid = json.dumps({"prompt": "Hello", "max_tokens": 2}).encode()


@fuzz(80)
@given(
    data=st.one_of(
        st.binary(max_size=80),  # random bytes
        st.integers(0, len(valid) - 1).map(lambda n: valid[:n]),  # cut short
        bad_utf8.map(lambda b: b'{"prompt": "' + b + b'", "max_tokens": 2}'),
        st.sampled_from([b'{"prompt": "\\ud800", "max_tokens": 2}', b"[" * 100_000, b"{}" * 9]),
    ),
    content_type=st.sampled_from(
        ["application/json", "text/plain", "application/x-www-form-urlencoded",
         "multipart/form-data; boundary=x", "", "application/json; charset=latin-1", "\x7f"]
    ),
)  # fmt: skip
def test_malformed_bodies_and_content_types(served, data, content_type):
    headers = {"content-type": content_type}
    status, body = http_request(served, "POST", "/v1/completions", data, headers)
    assert_clear_http_answer(status, body)
    event(str(status))
    if data == valid:
        assert status == 200  # the content type is not checked, the body is


@fuzz(100)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "BREW"]),
    path=st.one_of(
        st.sampled_from(["/", "/v1", "/v1/", "/v1/models/x/y", "/v1/models/%ff", "/health/",
                         "/v1/completions/", "//v1/models", "/v1/../health", "/%00"]),
        st.text(st.characters(codec="ascii", exclude_characters=" ?#%\r\n\t"), max_size=30).map(
            lambda s: "/" + s.replace("\x00", "")
        ),
    ),
)  # fmt: skip
def test_random_paths_and_methods(served, method, path):
    if any(ord(c) < 33 or ord(c) == 127 for c in path):
        path = "/" + path.encode().hex()  # (http.client refuses control characters)
    status, body = http_request(served, method, path, b"{}" if method != "GET" else None)
    assert_clear_http_answer(status, body, method)
    event(str(status))


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udfff"}]},
         "messages[0].content"),
        ("/v1/chat/completions",
         {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
         "messages[0].content"),
    ],
)  # fmt: skip
def test_lone_surrogates_get_400(served, path, body, param):
    """JSON can carry them (escaped); the tokenizer cannot take them (it answered 500)."""
    status, reply = http_request(served, "POST", path, json.dumps(body).encode())
    assert status == 400, reply
    assert json.loads(reply)["error"]["param"] == param


def test_huge_fields(served):
    huge = "x" * 2_000_000
    cases = [
        ({"prompt": huge}, 400),  # over the context
        ({"prompt": "Hi", "stop": [huge] * 3, "max_tokens": 2}, 200),
        ({"messages": [{"role": "user", "content": "Hi"}] * 20_000}, 400),
        ({"prompt": list(range(200_000))}, 400),
        ({"prompt": "Hi", "stop_token_ids": list(range(100_000))}, 400),
        ({"prompt": "Hi", "max_tokens": 10**400}, 200),
    ]
    for body, want in cases:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        status, reply = http_request(served, "POST", path, body)
        assert status == want, (status, reply[:200])
        assert_clear_http_answer(status, reply)
    try:  # the server stops reading at the limit: it may reset the connection under the rest
        status, reply = http_request(served, "POST", "/v1/completions", b"x" * MAX_BODY_BYTES * 2)
        assert status == 413 and json.loads(reply)["error"]["message"]
    except ConnectionError:
        pass
    request = pb.GenerateRequest(prompt="x" * 3_000_000)
    code = status_of(served.stub.Generate, request, timeout=60)
    assert code == C.INVALID_ARGUMENT  # over the context
    code = status_of(served.stub.Generate, pb.GenerateRequest(prompt="x" * 5_000_000), timeout=60)
    assert code == C.RESOURCE_EXHAUSTED  # over grpc's 4 MiB message limit


def test_http_faults_left_the_server_unharmed(served, target, threads_before):
    assert_unharmed(served, target, threads_before)
