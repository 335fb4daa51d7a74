"""The OpenAI-compatible HTTP API over real sockets, driven by the official openai client:
workers in-process (tiny random models), sharing the runtime with a gRPC server."""

from __future__ import annotations

import http.client
import json
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from distspec.cluster.ray_cluster import ClusterConfig
from distspec.models.tokenizer import ChatMessage
from distspec.scheduler.runtime import Runtime, RuntimeConfig
from distspec.scheduler.scheduler import SchedulerConfig
from distspec.server.gateway import Gateway
from distspec.server.grpc_server import GrpcServer
from distspec.server.http_api import HttpServer
from distspec.server.openai_protocol import StopStrings
from distspec.server.security import ClientLimits, TlsConfig
from distspec.spec_decode.sampling import SamplingParams
from distspec.v1 import speculative_decoding_pb2 as pb
from distspec.v1 import speculative_decoding_pb2_grpc as pb_grpc
from distspec.workers.drafter import DrafterSpec
from distspec.workers.target import TargetSpec
from test_decoding import greedy_ar
from test_security import pki as security_pki  # noqa: F401  (a fixture: CA, server, client)
from tiny import EOS_ID

SLOTS = 2
MODEL = "tiny"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def runtime(tiny_dir, tiny_drafter_dir):
    cluster = ClusterConfig(
        target=TargetSpec(str(tiny_dir), num_slots=SLOTS, max_len=288),
        drafter=DrafterSpec(str(tiny_drafter_dir), str(tiny_dir), max_len=288),
    )
    scheduler = SchedulerConfig(mode="pearl", max_waiting=1, idle_timeout_s=120)
    rt = Runtime(RuntimeConfig(cluster, scheduler, use_ray=False))
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def gateway(runtime):
    return Gateway(runtime)


@pytest.fixture(scope="module")
def base_url(gateway):
    srv = HttpServer(gateway, port=0, host="127.0.0.1", model=MODEL)
    port = srv.start()
    yield f"http://127.0.0.1:{port}"
    srv.stop()


@pytest.fixture(scope="module")
def client(base_url):
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def expected(target, prompt_ids: list[int], n: int) -> tuple[list[int], str]:
    """Greedy tokens as the server gives them (up to EOS) and the finish reason."""
    ids = greedy_ar(target, prompt_ids, n)
    if EOS_ID in ids:
        return ids[: ids.index(EOS_ID) + 1], "stop"
    return ids, "length"


def post(base_url: str, path: str, body, headers=None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of a raw POST; body: bytes as they are, else JSON."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        base_url + path, data, {"content-type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def get(base_url: str, path: str, headers=None) -> tuple[int, dict]:
    request = urllib.request.Request(base_url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_for(condition, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def all_free(runtime) -> bool:
    state = runtime.scheduler.state()
    return state.free_slots == SLOTS and state.waiting == 0


# ---------------------------------------------------------------------------------------------
# completions and chat completions


def test_completion_equals_greedy_decoding(runtime, target, client):
    prompt_ids = runtime.tokenizer.encode(PROMPT)
    ids, finish = expected(target, prompt_ids, 30)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].text == runtime.tokenizer.decode(ids)
    assert r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(ids)
    assert r.usage.total_tokens == len(prompt_ids) + len(ids)


def test_usage_reports_the_prompt_tokens_the_slot_held(runtime, client):
    """OpenAI's usage.prompt_tokens_details.cached_tokens: a prompt sent again runs only its
    last token (the scheduler gives it the slot that holds it; models/prefix_cache.py)."""
    prompt = PROMPT + " Once more."
    n = len(runtime.tokenizer.encode(prompt))
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens < n - 1
    assert again.usage.prompt_tokens_details.cached_tokens == n - 1
    assert again.choices[0].text == first.choices[0].text


def test_completion_stream(runtime, target, client):
    prompt_ids = runtime.tokenizer.encode(PROMPT)
    ids, finish = expected(target, prompt_ids, 30)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *text_chunks, last = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == runtime.tokenizer.decode(ids)
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == finish
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert all(c.usage is None for c in text_chunks)
    assert last.choices == [] and last.usage.completion_tokens == len(ids)
    assert last.usage.prompt_tokens == len(prompt_ids)
    assert len({c.id for c in chunks}) == 1
    # without include_usage: no usage chunk
    plain = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, stream=True))
    assert plain[-1].choices[0].finish_reason is not None


@pytest.mark.parametrize(
    "prompt", [[PROMPT], "ids", ["ids"]], ids=["list-of-one", "token-ids", "list-of-token-ids"]
)
def test_completion_prompt_forms(runtime, target, client, prompt):
    prompt_ids = runtime.tokenizer.encode(PROMPT)
    if prompt == "ids":
        prompt = prompt_ids
    elif prompt == ["ids"]:
        prompt = [prompt_ids]
    ids, _ = expected(target, prompt_ids, 10)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10)
    assert r.choices[0].text == runtime.tokenizer.decode(ids)


def test_chat_completion_applies_the_template(runtime, target, client):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]
    prompt_ids = runtime.tokenizer.encode_chat(
        [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi there")]
    )
    ids, finish = expected(target, prompt_ids, 12)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == runtime.tokenizer.decode(ids)
    assert r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == len(ids)
    # text parts and max_completion_tokens, as newer clients send them
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}]
    r2 = client.chat.completions.create(
        model=MODEL, messages=parts + messages[1:], max_completion_tokens=12
    )
    assert r2.choices[0].message.content == r.choices[0].message.content


def test_chat_completion_stream(runtime, target, client):
    prompt_ids = runtime.tokenizer.encode_chat([ChatMessage("user", "Hi there")])
    ids, finish = expected(target, prompt_ids, 12)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi there"}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *deltas, last = chunks
    text = "".join(c.choices[0].delta.content or "" for c in deltas)
    assert text == runtime.tokenizer.decode(ids)
    assert deltas[-1].choices[0].finish_reason == finish
    assert last.choices == [] and last.usage.completion_tokens == len(ids)


def test_grpc_and_http_share_the_engine(runtime, gateway, client):
    """One runtime behind both doors: the same request, the same tokens."""
    server = GrpcServer(runtime, port=0, host="127.0.0.1", gateway=gateway)
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SpeculativeDecodingStub(channel)
            request = pb.GenerateRequest(prompt=PROMPT, max_new_tokens=20)
            grpc_text = "".join(r.text for r in stub.Generate(request, timeout=60))
    finally:
        server.stop(grace_s=1)
    assert server.servicer.ledger is gateway.ledger
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20)
    assert r.choices[0].text == grpc_text


# ---------------------------------------------------------------------------------------------
# stop strings, seeds


def _stop_string(text: str) -> tuple[str, int]:
    """A 2-character piece of text (no replacement characters), first seen at index >= 2."""
    for i in range(2, len(text) - 1):
        piece = text[i : i + 2]
        if "\ufffd" not in piece and piece.isprintable() and text.find(piece) == i:
            return piece, i
    raise AssertionError(f"no stop string to pick in {text!r}")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_strings_end_and_trim_the_text(runtime, target, client, stream):
    prompt_ids = runtime.tokenizer.encode(PROMPT)
    ids, _ = expected(target, prompt_ids, 40)
    full = runtime.tokenizer.decode(ids)
    stop, at = _stop_string(full)
    # the tokens it takes to complete the stop string
    needed = next(k for k in range(1, len(ids) + 1) if stop in runtime.tokenizer.decode(ids[:k]))
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=40, stop=["never-seen", stop])
    if stream:
        chunks = list(
            client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
        )
        text = "".join(c.choices[0].text for c in chunks[:-1])
        finish = chunks[-2].choices[0].finish_reason
        usage = chunks[-1].usage
    else:
        r = client.completions.create(**kwargs)
        text, finish, usage = r.choices[0].text, r.choices[0].finish_reason, r.usage
    assert text == full[:at]
    assert finish == "stop"
    assert usage.completion_tokens == needed
    wait_for(lambda: all_free(runtime))  # the stopped session gave its slot back


@pytest.mark.parametrize(
    "stops, pieces, out",
    [
        (["abc"], ["xa", "b", "d"], ["x", "", "abd"]),  # held back, then not a stop after all
        (["abc"], ["xab", "cde"], ["x", "!"]),  # "!": stopped, nothing more
        (["abc", "b"], ["xab"], ["xa!"]),  # the earliest stop wins
        (["\n\n"], ["one\n", "\ntwo"], ["one", "!"]),
        (["zz"], ["az", "z"], ["a", "!"]),
        (["zz"], ["az"], ["az"]),  # the last piece: nothing held back
    ],
)
def test_stop_strings_hold_back_what_may_begin_one(stops, pieces, out):
    matcher = StopStrings(stops)
    got = []
    for i, piece in enumerate(pieces):
        text, stopped = matcher.push(piece, final=i == len(pieces) - 1)
        got.append(text + ("!" if stopped else ""))
        if stopped:
            break
    assert got == out


def test_chat_stop_string(runtime, client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=30)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    stop, at = _stop_string(full)
    r = client.chat.completions.create(**kwargs, stop=stop)
    assert r.choices[0].message.content == full[:at]
    assert r.choices[0].finish_reason == "stop"


def test_seeded_sampling_reproduces(client):
    kwargs = dict(model=MODEL, prompt="Hello", max_tokens=20, temperature=1.0, top_p=0.9)
    a = client.completions.create(**kwargs, seed=5).choices[0].text
    b = client.completions.create(**kwargs, seed=5).choices[0].text
    streamed = client.completions.create(**kwargs, seed=5, stream=True)
    assert a == b == "".join(c.choices[0].text for c in streamed)


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "path, body, param, fragment",
    [
        ("/v1/completions", b"{", None, "not valid JSON"),
        ("/v1/completions", [1, 2], None, "JSON object"),
        ("/v1/completions", {"model": MODEL}, "prompt", "required"),
        ("/v1/completions", {"prompt": ""}, "prompt", "empty"),
        ("/v1/completions", {"prompt": 5}, "prompt", "prompt must be"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "prompt", "batches"),
        ("/v1/completions", {"prompt": [10**6]}, "prompt", "outside the vocabulary"),
        ("/v1/completions", {"prompt": "x" * 400}, "prompt", "context"),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens", ">= 1"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "9"}, "max_tokens", "integer"),
        ("/v1/completions", {"prompt": "x", "temperature": -0.5}, "temperature", ">= 0"),
        ("/v1/completions", {"prompt": "x", "temperature": True}, "temperature", "number"),
        ("/v1/completions", {"prompt": "x", "temperature": 10**400}, "temperature", "range"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p", "(0, 1]"),
        ("/v1/completions", {"prompt": "x", "top_p": 1.5}, "top_p", "(0, 1]"),
        ("/v1/completions", {"prompt": "x", "n": 2}, "n", "n must be 1"),
        ("/v1/completions", {"prompt": "x", "seed": -1}, "seed", "seed"),
        ("/v1/completions", {"prompt": "x", "stop": [1]}, "stop", "strings"),
        ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop", "empty"),
        ("/v1/completions", {"prompt": "x", "logprobs": 2}, "logprobs", "not supported"),
        ("/v1/completions", {"prompt": "x", "stream_options": {}}, "stream_options", "stream"),
        ("/v1/chat/completions", {"messages": []}, "messages", "non-empty"),
        ("/v1/chat/completions", {"prompt": "x"}, "messages", "required"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
            "role must be one of",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": ""}]},
            "messages[0].content",
            "empty",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content",
            "text parts",
        ),
    ],
)
def test_bad_requests_get_400(runtime, base_url, path, body, param, fragment):
    status, _, reply = post(base_url, path, body)
    assert status == 400, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fragment in error["message"]
    assert "Traceback" not in json.dumps(reply)
    assert all_free(runtime)


def test_bad_request_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=-3)
    assert err.value.status_code == 400
    assert err.value.body["param"] == "max_tokens"


def test_unknown_model_and_route_get_404(base_url, client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    status, reply = get(base_url, "/v1/nothing-here")
    assert status == 404 and reply["error"]["type"] == "invalid_request_error"
    status, reply = get(base_url, "/v1/completions")  # POST only
    assert status == 405 and "error" in reply


def test_models_and_health(base_url, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert get(base_url, "/health") == (200, {"status": "serving"})


def test_full_scheduler_gets_429_with_retry_after(runtime, client):
    # external sessions without draft chunks hold both slots, one more waits
    ids = runtime.tokenizer.encode("Hello")
    holders = [
        runtime.scheduler.submit(ids, SamplingParams(max_new_tokens=5), external=True)
        for _ in range(SLOTS + 1)
    ]
    try:
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model=MODEL, prompt="Hello", max_tokens=5)
        assert err.value.status_code == 429
        assert err.value.body["type"] == "rate_limit_error"
        assert "busy" in err.value.body["message"]
        assert int(err.value.response.headers["retry-after"]) >= 1
        assert int(err.value.response.headers["retry-after-ms"]) > 0
    finally:
        for h in holders:
            runtime.scheduler.cancel(h.id)
    wait_for(lambda: all_free(runtime))


# ---------------------------------------------------------------------------------------------
# tokens, per-client limits, shutdown, TLS


@pytest.fixture
def guarded(runtime):
    """A second door on the same runtime: bearer tokens, one open session per client."""
    gateway = Gateway(runtime, ClientLimits(max_sessions=1))
    srv = HttpServer(gateway, host="127.0.0.1", model=MODEL, tokens={"good", "other"})
    base = f"http://127.0.0.1:{srv.start()}"
    yield gateway, srv, base
    srv.stop()


def _client(base: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


def test_bearer_tokens_are_required(guarded):
    _, _, base = guarded
    with _client(base, "wrong") as c, pytest.raises(openai.AuthenticationError) as err:
        c.completions.create(model=MODEL, prompt="Hi", max_tokens=3)
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    status, _, reply = post(base, "/v1/completions", {"prompt": "Hi"})  # no header at all
    assert status == 401 and reply["error"]["type"] == "invalid_request_error"
    assert get(base, "/v1/models")[0] == 401
    assert get(base, "/health")[0] == 200  # health stays open
    with _client(base, "good") as c:
        assert c.completions.create(model=MODEL, prompt="Hi", max_tokens=3).usage.completion_tokens
        assert [m.id for m in c.models.list()] == [MODEL]


def test_per_client_limits_span_the_doors(runtime, guarded):
    gateway, _, base = guarded
    # a session the client holds through another door (as a gRPC Speculate stream would)
    held = gateway.submit(
        "token:good", runtime.tokenizer.encode("Hi"), SamplingParams(), external=True
    )
    try:
        with _client(base, "good") as c, pytest.raises(openai.RateLimitError) as err:
            c.completions.create(model=MODEL, prompt="Hi", max_tokens=3)
        assert "session limit" in err.value.body["message"]
        with _client(base, "other") as c:
            assert c.completions.create(model=MODEL, prompt="Hi", max_tokens=3).choices
    finally:
        runtime.scheduler.cancel(held.id)
        gateway.release("token:good")
    wait_for(lambda: all_free(runtime))


def test_draining_server_answers_503(guarded):
    _, srv, base = guarded
    srv.drain()
    status, _, reply = post(
        base, "/v1/completions", {"prompt": "Hi"}, {"authorization": "Bearer good"}
    )
    assert status == 503 and reply["error"]["code"] == "service_unavailable"
    assert get(base, "/health") == (503, {"status": "shutting down"})


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_ends_open_requests_after_the_grace_period(runtime, gateway, stream):
    srv = HttpServer(gateway, host="127.0.0.1", model=MODEL, grace_s=0.3)
    port = srv.start()
    ids = runtime.tokenizer.encode("Hello")
    holders = [runtime.scheduler.submit(ids, SamplingParams(), external=True) for _ in range(2)]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        body = json.dumps({"prompt": "Hi", "stream": stream})
        conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
        wait_for(lambda: runtime.scheduler.state().waiting == 1)  # it waits for a slot
        srv.stop()
        assert runtime.scheduler.state().waiting == 0  # its session went with it
        response = conn.getresponse()
        reply = response.read().decode()
    finally:
        conn.close()
        for h in holders:
            runtime.scheduler.cancel(h.id)
    if stream:
        assert response.status == 200
        error, done = reply.strip().split("\n\n")
        assert json.loads(error.removeprefix("data: "))["error"]["code"] == "service_unavailable"
        assert done == "data: [DONE]"
    else:
        assert response.status == 503
        assert json.loads(reply)["error"]["code"] == "service_unavailable"
    wait_for(lambda: all_free(runtime))


def test_https_with_client_certificates(gateway, request):
    pki = request.getfixturevalue("security_pki")
    tls = TlsConfig(pki["server"], pki["server_key"], client_ca=pki["ca"])
    srv = HttpServer(gateway, host="127.0.0.1", model=MODEL, tls=tls)
    base = f"https://127.0.0.1:{srv.start()}/v1"
    try:
        context = ssl.create_default_context(cafile=pki["ca"])
        context.load_cert_chain(pki["client"], pki["client_key"])
        http_client = openai.DefaultHttpxClient(verify=context)
        with openai.OpenAI(base_url=base, api_key="x", max_retries=0, http_client=http_client) as c:
            assert c.completions.create(model=MODEL, prompt="Hi", max_tokens=3).choices
        # without a client certificate the handshake fails
        anonymous = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=pki["ca"]))
        c = openai.OpenAI(base_url=base, api_key="x", max_retries=0, http_client=anonymous)
        with c, pytest.raises(openai.APIConnectionError):
            c.completions.create(model=MODEL, prompt="Hi", max_tokens=3)
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------
# disconnects


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_disconnect_cancels_the_session(runtime, gateway, base_url, monkeypatch, stream):
    sessions = []
    submit = gateway.submit

    def recording(*args, **kwargs):
        sessions.append(submit(*args, **kwargs))
        return sessions[-1]

    monkeypatch.setattr(gateway, "submit", recording)
    port = int(base_url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = {"prompt": "Hi", "max_tokens": 250, "stream": stream}
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    if stream:
        response = conn.getresponse()
        assert response.status == 200
        assert response.read(6) == b"data: "
    else:
        wait_for(lambda: sessions and sessions[0].produced > 0)
    conn.sock.close()  # the client goes away mid-answer
    conn.close()
    wait_for(lambda: sessions[0].finished)
    assert sessions[0].finish_reason == "cancelled"
    assert sessions[0].produced < 250
    wait_for(lambda: all_free(runtime))


# ---------------------------------------------------------------------------------------------
# distspec serve --http-port


def test_serve_http_port_answers_and_stops_on_sigterm(tmp_path, tiny_dir):
    config = tmp_path / "serve.yaml"
    config.write_text(
        f"target: {tiny_dir}\ndrafter: none\nnum_slots: 2\nmax_len: 288\n"
        "use_ray: false\nport: 0\nhost: 127.0.0.1\nserved_model_name: tiny-served\n"
    )
    args = [sys.executable, "-m", "distspec", "serve", "--config", str(config), "--http-port", "0"]
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            first, second = proc.stdout.readline(), proc.stdout.readline()
            assert re.search(r"serving .* \(ar\) on 127.0.0.1:\d+$", first.strip()), first
            match = re.search(r"\(tiny-served\) on (http://127.0.0.1:\d+/v1)$", second.strip())
            assert match, first + second + proc.stderr.read()
            with openai.OpenAI(base_url=match.group(1), api_key="x", max_retries=0) as c:
                r = c.completions.create(model="tiny-served", prompt="abcabc", max_tokens=8)
                assert r.usage.completion_tokens == 8
                messages = [{"role": "user", "content": "Hi"}]
                stream = c.chat.completions.create(
                    model="tiny-served", messages=messages, max_tokens=4, stream=True
                )
                assert list(stream)[-1].choices[0].finish_reason in ("stop", "length")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
            assert "Traceback" not in proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()


# ---------------------------------------------------------------------------------------------
# the demo model (slow)

DEMO_MAX_TOKENS = 24
RAW_PROMPT = "The three primary colors are"
CHAT_PROMPT = "What is the capital of France? Answer in one sentence."


@pytest.mark.slow
def test_demo_greedy_matches_the_engine():
    from distspec.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(target="demo", mode="ar", max_len=512))
    want = {}
    for chat, prompt in ((False, RAW_PROMPT), (True, CHAT_PROMPT)):
        ids = engine.encode(prompt, raw=not chat)
        params = SamplingParams(max_new_tokens=DEMO_MAX_TOKENS)
        want[chat] = "".join(delta for delta, _ in engine.stream_text(ids, params))
    engine.close()
    cluster = ClusterConfig(
        target=TargetSpec("demo", num_slots=2, max_len=512),
        drafter=DrafterSpec("ngram", "demo", num_slots=2, max_len=512),
    )
    scheduler = SchedulerConfig(mode="sd", gamma=4)
    runtime = Runtime(RuntimeConfig(cluster, scheduler, use_ray=False))
    srv = HttpServer(Gateway(runtime), host="127.0.0.1", model="demo")
    try:
        base = f"http://127.0.0.1:{srv.start()}/v1"
        with openai.OpenAI(base_url=base, api_key="x", max_retries=0) as c:
            kwargs = dict(model="demo", prompt=RAW_PROMPT, max_tokens=DEMO_MAX_TOKENS)
            assert c.completions.create(**kwargs).choices[0].text == want[False]
            stream = c.completions.create(**kwargs, stream=True)
            assert "".join(x.choices[0].text for x in stream) == want[False]
            messages = [{"role": "user", "content": CHAT_PROMPT}]
            kwargs = dict(model="demo", messages=messages, max_tokens=DEMO_MAX_TOKENS)
            r = c.chat.completions.create(**kwargs)
            assert r.choices[0].message.content == want[True]
            stream = c.chat.completions.create(**kwargs, stream=True)
            assert "".join(x.choices[0].delta.content or "" for x in stream) == want[True]
    finally:
        srv.stop()
        runtime.close()
