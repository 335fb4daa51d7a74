"""Tokenizer: a Hugging Face `tokenizer.json` plus the model's chat template and stop tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer


@dataclass
class ChatMessage:
    role: str
    content: str


def _raise(message: str):
    raise jinja2.TemplateError(message)


@dataclass
class Tokenizer:
    backend: HFTokenizer
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_dir(cls, path: str | Path, eos_token_ids: list[int] | None = None) -> Tokenizer:
        path = Path(path)
        backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        template = cfg.get("chat_template")
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t["name"] == "default"), None)
        bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
        ids = list(eos_token_ids or [])
        if eos is not None and backend.token_to_id(eos) is not None:
            ids.append(backend.token_to_id(eos))
        return cls(backend, template, bos, eos, sorted(set(ids)))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template; pass raw text instead")
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template refused these messages: {e}") from e

    def encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        """As transformers' apply_chat_template(..., add_generation_prompt=True)."""
        return self.encode(self.render_chat(messages), add_special_tokens=False)


def _token_text(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class StreamDecoder:
    """Incremental detokenisation: text deltas that never split a multi-byte character."""

    def __init__(self, tokenizer: Tokenizer, sent_ids: list[int] | None = None):
        """sent_ids: tokens whose text the reader already has (a resumed stream)."""
        self.tokenizer = tokenizer
        self.ids: list[int] = list(sent_ids or [])
        self.emitted = tokenizer.decode(self.ids) if self.ids else ""

    def push(self, ids: list[int], final: bool = False) -> str:
        """The text the new ids complete; final: the last push, whatever bytes are left."""
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") and not final:
            return ""
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted = text
        return delta
