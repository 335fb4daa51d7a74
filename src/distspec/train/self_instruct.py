"""Self-instruct prompts: the target writes user requests itself.

Given only the chat template's opening up to the user's turn, an instruction-tuned model
continues with a plausible user message (the "Magpie" trick). Sampled at a moderate
temperature this yields requests far more varied than any template list, drawn from what the
model was tuned on, which is what the drafter has to predict answers to.
"""

from __future__ import annotations

from distspec.models.llama import Transformer
from distspec.models.tokenizer import ChatMessage, Tokenizer
from distspec.train.datagen import generate_samples

_MARK = "\x00QUERY\x00"


def query_prefix(tok: Tokenizer) -> list[int]:
    """Token ids of the chat prompt up to where the user's message starts."""
    rendered = tok.render_chat([ChatMessage("user", _MARK)])
    return tok.encode(rendered[: rendered.index(_MARK)], add_special_tokens=False)


def generate_queries(
    model: Transformer,
    tok: Tokenizer,
    n: int,
    *,
    temperature: float = 0.8,
    max_tokens: int = 64,
    seed: int = 0,
    exclude: set[str] = frozenset(),
) -> list[str]:
    """n distinct user requests written by the model, in a deterministic order."""
    prefix = query_prefix(tok)
    out: list[str] = []
    seen = set(exclude)
    for round_ in range(8):
        want = int((n - len(out)) * 1.5) + 8
        samples = generate_samples(
            model,
            [(prefix, temperature)] * want,
            max_new_tokens=max_tokens,
            stop_ids=tok.eos_token_ids,
            seed=seed * 101 + round_,
        )
        for s in samples:
            if s.output_ids[-1] not in tok.eos_token_ids:
                continue  # cut off at max_tokens: not a finished request
            text = tok.decode(s.output_ids[:-1]).strip()
            if 3 <= len(text.split()) <= 60 and text not in seen:
                seen.add(text)
                out.append(text)
        if len(out) >= n:
            return out[:n]
    raise RuntimeError(f"the model wrote only {len(out)} usable requests of {n}")
