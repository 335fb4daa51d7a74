"""Hypothesis strategies for tests/test_hostile_input.py. Requests start valid and get a few
fields broken (hostile values: NaN, infinities, huge numbers, ids outside the vocabulary,
empty or huge strings, wrong types), so that both the checks and what lies behind them
(sampling with edge values, sessions, stop strings) are exercised."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import strategies as st

from distspec.v1 import speculative_decoding_pb2 as pb
from served import MAX_LEN
from tiny import TINY_VOCAB

uint32 = st.integers(0, 300) | st.integers(0, 2**32 - 1)
uint64 = st.integers(0, 2**8) | st.integers(0, 2**64 - 1)
float32 = st.floats(width=32) | st.sampled_from([0.0, 0.5, 1.0, 1e-30, -1.0, float("nan")])
texts = st.text(max_size=40) | st.sampled_from(["", "Hello", "x" * 400, "x" * 300_000])
good_texts = st.sampled_from(["Hello", "abc", "Once upon a time"]) | st.text(
    min_size=1, max_size=30
).filter(str.strip)
roles = st.sampled_from(["user", "system", "assistant", "robot", ""]) | st.text(max_size=8)
chat = st.lists(st.builds(pb.ChatMessage, role=roles, content=texts), max_size=3)
good_chat = st.lists(
    st.builds(pb.ChatMessage, role=st.sampled_from(["user", "system"]), content=good_texts),
    min_size=1,
    max_size=2,
)

# sampling fields: (valid values, hostile values)
SAMPLING = {
    "max_new_tokens": (st.integers(1, 6), uint32),
    "temperature": (st.sampled_from([0.0, 0.7, 1.0]) | st.floats(0, 1e6, width=32), float32),
    "top_p": (st.floats(0, 1, exclude_min=True, width=32), float32),
    "top_k": (st.integers(0, 300) | st.just(2**32 - 1), uint32),
    "seed": (st.integers(0, 2**63 - 1), uint64),
}


def _sampling(draw, message, broken: set[str]) -> None:
    for name, (valid, hostile) in SAMPLING.items():
        if name in broken:
            setattr(message, name, draw(hostile))
            continue
        value = draw(st.none() | valid)
        if value is not None:
            setattr(message, name, value)
    in_vocab = st.integers(0, TINY_VOCAB - 1)
    stops = st.lists(uint32 if "stop_token_ids" in broken else in_vocab, max_size=3)
    message.stop_token_ids.extend(draw(stops))


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    broken = draw(st.sets(st.sampled_from([*SAMPLING, "stop_token_ids", "prompt"]), max_size=2))
    request = pb.GenerateRequest()
    if "prompt" in broken:  # any mix of prompt and messages, right or wrong
        request.prompt = draw(texts)
        request.messages.extend(draw(chat))
    elif draw(st.booleans()):
        request.prompt = draw(good_texts)
    else:
        request.messages.extend(draw(good_chat))
    _sampling(draw, request, broken)
    return request


@st.composite
def open_sessions(draw) -> pb.OpenSession:
    good = ["prompt", "messages", "ids"] * 3  # (most sessions open, to take chunks)
    kind = draw(st.sampled_from([*good, "bad-ids", "several", "none", "resume"]))
    open_ = pb.OpenSession(keep_decoding=draw(st.booleans()))
    if kind == "prompt":
        open_.prompt = draw(good_texts)
    elif kind == "messages":
        open_.messages.extend(draw(good_chat))
    elif kind == "ids":
        open_.prompt_token_ids.extend(
            draw(st.lists(st.integers(0, TINY_VOCAB - 1), min_size=1, max_size=20))
        )
    elif kind == "bad-ids":
        ids = st.integers(0, TINY_VOCAB - 1) | uint32
        open_.prompt_token_ids.extend(draw(st.lists(ids, max_size=MAX_LEN + 2)))
    elif kind == "several":
        open_.prompt = draw(texts)
        open_.messages.extend(draw(chat))
        open_.prompt_token_ids.extend(draw(st.lists(uint32, max_size=3)))
    elif kind == "resume":
        open_.resume_session_id = draw(st.sampled_from(["1", "2", "999"]) | st.text(max_size=8))
        open_.resume_secret = draw(st.text(max_size=32))
        open_.resume_position = draw(uint32)
    broken = draw(st.sets(st.sampled_from([*SAMPLING, "stop_token_ids"]), max_size=1))
    _sampling(draw, open_.sampling, broken)
    if "max_new_tokens" not in broken:  # short (the test drives it to its end), but not so
        open_.sampling.max_new_tokens = draw(st.integers(3, 8))  # short it ends before chunks
    return open_


@st.composite
def draft_chunks(draw) -> Callable[[int, int], pb.DraftChunk]:
    """A chunk for a session with `verified` tokens of which `prompt` are the prompt: drawn
    before the session opens (a draw that fails mid-session would leave it open)."""
    where = draw(st.sampled_from(["near", "prompt", "any"]))
    delta = draw(st.integers(-2, 1))
    anywhere = draw(uint32)
    tokens = draw(st.lists(st.integers(0, TINY_VOCAB - 1), max_size=10))
    if draw(st.integers(0, 3)) == 0:  # one outside the vocabulary
        tokens.insert(
            draw(st.integers(0, len(tokens))),
            draw(st.integers(TINY_VOCAB, TINY_VOCAB + 2) | uint32),
        )

    def make(verified: int, prompt: int) -> pb.DraftChunk:
        position = {
            "near": max(0, verified + delta),  # about right
            "prompt": max(0, prompt + delta),  # (mostly) in the prompt
            "any": anywhere,
        }[where]
        return pb.DraftChunk(position=position, token_ids=tokens)

    return make


# -- raw protobuf --------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, written by hand (protobuf refuses bad UTF-8)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


bad_utf8 = st.binary(min_size=1, max_size=24).filter(_not_utf8)

# -- HTTP ------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# the fields a body may carry, with hostile values besides random JSON
HOSTILE_FIELDS = {
    "model": st.sampled_from(["tiny", "gpt-4", "", "\ud800"]),
    "prompt": texts | st.lists(st.integers(-2, 2**40), max_size=5) | st.lists(texts, max_size=2),
    "messages": st.lists(
        st.fixed_dictionaries({"role": roles, "content": texts | json_values}), max_size=3
    ),
    "max_tokens": st.integers(-2, 4) | st.integers() | st.floats(),
    "max_completion_tokens": st.integers(-2, 4) | st.integers(),
    "temperature": st.floats() | st.integers(),
    "top_p": st.floats() | st.integers(),
    "top_k": st.integers(),
    "seed": st.integers(),
    "stop": texts | st.lists(texts, max_size=20),
    "stop_token_ids": st.lists(st.integers(), max_size=3),
    "n": st.integers(),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": json_values}),
    "logprobs": json_values,
    "echo": st.booleans(),
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
    "logit_bias": st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    "tools": st.lists(json_values, max_size=2),
}


@st.composite
def completion_bodies(draw, chat: bool) -> object:
    """A valid body with up to three fields broken, dropped or added; or any JSON value."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    body: dict = {"model": "tiny", "max_tokens": draw(st.integers(1, 4))}
    if chat:
        body["messages"] = [{"role": m.role, "content": m.content} for m in draw(good_chat)]
    else:
        ids = st.lists(st.integers(0, TINY_VOCAB - 1), min_size=1, max_size=5)
        body["prompt"] = draw(good_texts | ids)
    if draw(st.booleans()):
        body["temperature"] = draw(st.sampled_from([0, 0.5, 1.0]))
        body["top_p"] = draw(st.floats(0.01, 1))
        body["top_k"] = draw(st.sampled_from([-1, 0, 5, 10**6]))
        body["seed"] = draw(st.integers(0, 2**63 - 1))
    if draw(st.booleans()):
        body["stop"] = draw(st.lists(good_texts, max_size=3))
        body["stream"] = draw(st.booleans())
        if body["stream"] and draw(st.booleans()):
            body["stream_options"] = {"include_usage": draw(st.booleans())}
    for name in draw(st.sets(st.sampled_from(sorted(HOSTILE_FIELDS)), max_size=3)):
        action = draw(st.sampled_from(["hostile", "random", "drop"]))
        if action == "drop":
            body.pop(name, None)
        else:
            body[name] = draw(HOSTILE_FIELDS[name] if action == "hostile" else json_values)
    return body
