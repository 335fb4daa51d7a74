"""The OpenAI wire format of /v1/completions and /v1/chat/completions: request bodies checked
into CompletionRequest, response and stream-chunk bodies, error bodies, and stop strings
found in streamed text."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from distspec.models.tokenizer import ChatMessage
from distspec.server.gateway import InvalidRequest

COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat: up to the context
MAX_STOP_STRINGS = 16
# Fields that would change the answer if ignored, and the values that change nothing.
UNSUPPORTED = {
    "echo": (None, False),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
}


@dataclass
class CompletionRequest:
    chat: bool
    model: str | None = None
    prompt: str | list[int] | None = None  # completions: text or token ids
    messages: list[ChatMessage] = field(default_factory=list)  # chat
    max_tokens: int | None = None
    max_tokens_param: str = "max_tokens"  # or max_completion_tokens, as the client sent it
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extension
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # vLLM's extension
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage


def parse_request(body: Any, chat: bool) -> CompletionRequest:
    """The request's fields, type-checked; InvalidRequest names the first bad one. Ranges
    (temperature, top_p, ...) are the Gateway's to check."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    for name, neutral in UNSUPPORTED.items():
        if body.get(name) not in neutral:
            raise InvalidRequest(f"{name} is not supported by this server", name)
    response_format = _get(body, "response_format", dict, "an object")
    if response_format and response_format.get("type", "text") != "text":
        raise InvalidRequest("only the text response_format is supported", "response_format")
    n = _get(body, "n", int, "an integer")
    if n is not None and n != 1:
        raise InvalidRequest(f"n must be 1 (one choice per request), got {n}", "n")
    r = CompletionRequest(chat=chat)
    r.model = _get(body, "model", str, "a string")
    if chat:
        r.messages = _messages(body.get("messages"))
        given = body.get("max_completion_tokens") is not None
        r.max_tokens_param = "max_completion_tokens" if given else "max_tokens"
        r.max_tokens = _get(body, r.max_tokens_param, int, "an integer")
    else:
        r.prompt = _prompt(body.get("prompt"))
        r.max_tokens = _get(body, "max_tokens", int, "an integer")
        if r.max_tokens is None:
            r.max_tokens = COMPLETIONS_MAX_TOKENS
    r.temperature = _get(body, "temperature", float, "a number")
    r.top_p = _get(body, "top_p", float, "a number")
    r.top_k = _get(body, "top_k", int, "an integer")
    if r.top_k == -1:  # vLLM's "off"
        r.top_k = 0
    r.seed = _get(body, "seed", int, "an integer")
    r.stop = _stop(body.get("stop"))
    ids = _get(body, "stop_token_ids", list, "a list of token ids") or []
    if not all(_is_int(t) for t in ids):
        raise InvalidRequest("stop_token_ids must be a list of token ids", "stop_token_ids")
    r.stop_token_ids = ids
    r.stream = bool(_get(body, "stream", bool, "a boolean"))
    options = _get(body, "stream_options", dict, "an object")
    if options is not None:
        if not r.stream:
            raise InvalidRequest("stream_options is only allowed with stream", "stream_options")
        include = options.get("include_usage", False)
        if not isinstance(include, bool):
            raise InvalidRequest(
                "stream_options.include_usage must be a boolean", "stream_options.include_usage"
            )
        r.include_usage = include
    return r


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _get(body: dict, name: str, kind: type, what: str) -> Any:
    """body[name] if it is of the kind (float: any number), None if absent or null."""
    v = body.get(name)
    if v is None:
        return None
    ok = {int: _is_int(v), float: _is_int(v) or isinstance(v, float)}.get(kind)
    if ok is None:
        ok = isinstance(v, kind)
    if not ok:
        raise InvalidRequest(f"{name} must be {what}, got {type(v).__name__}", name)
    if kind is not float:
        return v
    try:
        return float(v)
    except OverflowError:  # an integer beyond any float
        raise InvalidRequest(f"{name} is out of range", name) from None


def _prompt(v: Any) -> str | list[int]:
    what = "a string, a list of one string or a list of token ids"
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str | list):
        v = v[0]  # one prompt in a batch of one
    if isinstance(v, str):
        if not v:
            raise InvalidRequest("prompt is empty", "prompt")
        return _unicode(v, "prompt")
    if v is None:
        raise InvalidRequest("prompt is required", "prompt")
    if isinstance(v, list) and all(_is_int(t) for t in v):
        if not v:
            raise InvalidRequest("prompt is empty", "prompt")
        return v
    if isinstance(v, list) and len(v) > 1 and all(isinstance(p, str | list) for p in v):
        raise InvalidRequest("one prompt per request: batches are not supported", "prompt")
    raise InvalidRequest(f"prompt must be {what}", "prompt")


def _messages(v: Any) -> list[ChatMessage]:
    if v is None:
        raise InvalidRequest("messages is required", "messages")
    if not isinstance(v, list) or not v:
        raise InvalidRequest("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest(
                f"messages[{i}] must be an object with a role and content", f"messages[{i}]"
            )
        role = "system" if m["role"] == "developer" else m["role"]
        out.append(ChatMessage(role, _content(m.get("content"), i)))
    return out


def _content(v: Any, i: int) -> str:
    """A message's text: a string, or a list of text parts (joined by newlines)."""
    param = f"messages[{i}].content"
    if v is None or isinstance(v, str):
        return _unicode(v or "", param)
    if isinstance(v, list):
        texts = []
        for part in v:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise InvalidRequest(f"{param}: only text parts are supported", param)
            if not isinstance(part.get("text"), str):
                raise InvalidRequest(f"{param}: a text part needs a string text", param)
            texts.append(_unicode(part["text"], param))
        return "\n".join(texts)
    raise InvalidRequest(f"{param} must be a string or a list of text parts", param)


def _unicode(text: str, param: str) -> str:
    """JSON may escape lone UTF-16 surrogates ("\\ud800"): no tokenizer takes those."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{param} is not valid Unicode (a lone surrogate)", param) from None
    return text


def _stop(v: Any) -> list[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequest("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"stop holds at most {MAX_STOP_STRINGS} strings", "stop")
    if any(not s for s in stops):
        raise InvalidRequest("stop strings must not be empty", "stop")
    return stops


# -- responses ---------------------------------------------------------------------------------


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass
class Reply:
    """The bodies of one request's answer: a whole one, or stream chunks sharing its id."""

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            self.id = ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)

    def _head(self, chunk: bool) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        if chunk and self.chat:
            kind += ".chunk"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def full(self, text: str, finish_reason: str, usage_: dict) -> dict:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice |= {"logprobs": None, "finish_reason": finish_reason}
        return self._head(False) | {"choices": [choice], "usage": usage_}

    def chunk(
        self, text: str, finish_reason: str | None = None, first: bool = False, usage_key=False
    ) -> dict:
        """first: the chat stream's opening chunk (it names the role); usage_key: the chunk
        carries "usage": null (include_usage streams)."""
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else {}
            if text and not first:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text
        choice |= {"logprobs": None, "finish_reason": finish_reason}
        body = self._head(True) | {"choices": [choice]}
        if usage_key:
            body["usage"] = None
        return body

    def usage_chunk(self, usage_: dict) -> dict:
        return self._head(True) | {"choices": [], "usage": usage_}


# -- stop strings ------------------------------------------------------------------------------


class StopStrings:
    """Finds stop strings in streamed text. It holds back the end of the text that may be
    the start of one, so no part of a stop string is ever sent."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.held = ""

    def push(self, text: str, final: bool = False) -> tuple[str, bool]:
        """(the text that may go out now, whether a stop string ended it)."""
        text = self.held + text
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held = ""
            return text[: min(found)], True
        keep = 0 if final else self._partial(text)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def _partial(self, text: str) -> int:
        """The length of the longest end of text that begins some stop string."""
        longest = min(len(text), max((len(s) for s in self.stops), default=1) - 1)
        for k in range(longest, 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stops):
                return k
        return 0
