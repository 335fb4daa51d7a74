"""The target model on one rank of its tensor-parallel group; the leader also decides.

The leader batches the sessions' chunks into as few forwards as padding allows, broadcasts
them to the other ranks, and verifies each session's draft against its own rows with that
session's generator: it is the one decision-maker, so ranks never have to agree on random
draws. KV rollback is bookkeeping in the scheduler (the next chunk's start position); a token
tree's accepted path is moved into place on every rank before the next forward reads it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from distspec.models.llama import pad_positions
from distspec.models.loader import load_for_inference
from distspec.spec_decode import tree
from distspec.spec_decode.draft_policy import time_target
from distspec.spec_decode.drafter import EMPTY_DRAFT, Draft
from distspec.spec_decode.sampling import SamplingParams
from distspec.spec_decode.verify import Verdict, verify
from distspec.workers.group import GroupMember, GroupSpec, join_group
from distspec.workers.messages import Decoded, ForwardItem, ModelInfo, Prefilled
from distspec.workers.placement import apply_placement, current_placement

# Chunks longer than this (prompts) get a forward of their own, so short chunks are not padded
# to a prompt's length.
ALONE_ABOVE = 32


@dataclass
class TargetSpec:
    model: str = "demo"
    num_slots: int = 16
    max_len: int = 2048
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    weight_dtype: str = "fp32"  # fp32 | int8 | int4 (weight-only quantized linears)
    activations: str = "fp32"  # what quantized linears multiply: fp32 | int8
    cpus: tuple[int, ...] = ()  # the cores this rank is pinned to (empty: not pinned)
    prefix_cache: bool = True  # prompts reuse what their slot holds of them


@dataclass
class _Forward:
    tokens: torch.Tensor  # [B, W]
    pos: torch.Tensor  # [B, W]
    slots: torch.Tensor  # [B]
    last_only: bool
    tree: torch.Tensor | None = None  # [B, W, W]: the chunks' attention, where one holds a tree


class TargetWorker(GroupMember):
    def __init__(self, spec: TargetSpec, group: GroupSpec | None = None):
        apply_placement(spec.cpus, spec.threads)
        self.tp = join_group(group or GroupSpec())
        loaded = load_for_inference(
            spec.model,
            spec.device,
            getattr(torch, spec.dtype),
            spec.max_len,
            spec.num_slots,
            tp=self.tp,
            weight_dtype=spec.weight_dtype,
            quant_activations=spec.activations,
        )
        self.model = loaded.model
        self.info = ModelInfo(
            vocab_size=self.model.config.vocab_size,
            # the last ALONE_ABOVE positions of each slot take the padding of batched chunks
            max_len=self.model.max_len - ALONE_ABOVE,
            num_slots=spec.num_slots,
            eos_token_ids=tuple(loaded.tokenizer.eos_token_ids),
        )
        self._sampling: dict[int, SamplingParams] = {}
        # deferred rows per session, and the position the first of them decides
        self._open_rows: dict[int, tuple[torch.Tensor, int]] = {}
        # accepted tree paths' K/V to move into place, (slot, from rows, to rows), on every
        # rank before the next forward
        self._moves: list[tuple[int, list[int], list[int]]] = []
        self.busy_s = 0.0  # time spent in forwards (the leader's view)
        self.steps = 0
        self.model.prefixes.enabled = spec.prefix_cache
        self.reused_tokens = 0  # prompt tokens not run again (models/prefix_cache.py)

    def model_info(self) -> ModelInfo:
        return self.info

    def placement(self) -> tuple[tuple[int, ...], int]:
        """(cores, torch threads) this rank computes with, read back."""
        return current_placement()

    def ready(self) -> bool:
        return True

    # -- leader API ------------------------------------------------------------------------

    def open_session(self, session: int, params: SamplingParams) -> None:
        self._sampling[session] = params  # the scheduler gave it a seed

    def close_session(self, session: int, slot: int | None = None, held: list[int] = ()) -> None:
        """held: the session's verified tokens but the newest, whose K/V its slot now holds
        (the scheduler's bookkeeping); kept for a later prompt that starts with them if the
        slot's record still starts the same (its prompt: no write cut it since)."""
        self._sampling.pop(session, None)
        self._open_rows.pop(session, None)
        prefixes = self.model.prefixes
        if slot is not None and held:
            record = prefixes.held(slot)
            if record and list(held[: len(record)]) == record:
                prefixes.hold(slot, held)

    def step(
        self, items: list[ForwardItem]
    ) -> tuple[list[Verdict | Decoded | Prefilled | None], float]:
        """One batched forward over every item's chunk: a verdict per item (None if deferred)
        and the seconds the forwards took. A prompt (an item from position 0 with an empty
        draft) runs from where its slot's record stops matching it and answers with a
        Prefilled. Multi-step items (ForwardItem.steps) go on
        decoding in further batched forwards of one token each, within this call, and answer
        with a Decoded: one call for several tokens, as vLLM's multi-step scheduling does."""
        prompts = {i: item.tokens for i, item in enumerate(items) if _is_prefill(item)}
        items = [self._skip_held(item) if i in prompts else item for i, item in enumerate(items)]
        verdicts, forward_s = self._forward_verify(items)
        for i, prompt in prompts.items():
            self.model.prefixes.hold(items[i].slot, prompt)
            verdicts[i] = Prefilled(verdicts[i].next_token, cached=items[i].start)
        decoding = {i: [verdicts[i].next_token] for i, item in enumerate(items) if item.steps > 1}
        while going := [
            i
            for i, new in decoding.items()
            if len(new) < items[i].steps and new[-1] not in items[i].stops
        ]:
            follow = [_next_step(items[i], decoding[i]) for i in going]
            more, seconds = self._forward_verify(follow)
            forward_s += seconds
            for i, verdict in zip(going, more, strict=True):
                decoding[i].append(verdict.next_token)
        for i, new in decoding.items():
            verdicts[i] = Decoded(new)
        return verdicts, forward_s

    def _forward_verify(self, items: list[ForwardItem]) -> tuple[list[Verdict | None], float]:
        plan = self._plan(items)
        t = time.perf_counter()
        moves, self._moves = self._moves, []
        outputs = self.collective("run_forwards", [f for _, f in plan], moves)
        forward_s = time.perf_counter() - t
        self.busy_s += forward_s
        self.steps += 1
        verdicts: list[Verdict | None] = [None] * len(items)
        for (members, fwd), logits in zip(plan, outputs, strict=True):
            for b, i in enumerate(members):
                item = items[i]
                rows = logits[b, -1:] if fwd.last_only else logits[b, : len(item.tokens)]
                end = item.start + len(item.tokens)  # the position the last row decides
                if item.defer:
                    self._open_rows[item.session] = (rows, end - len(rows) + 1)
                else:  # the rows of the chunk's last token before the draft and of the draft
                    rows = rows[-(len(item.draft) + 1) :]
                    verdict = self._verify(item.session, rows, end - len(rows) + 1, item.draft)
                    if verdict.path:
                        moved = tree.accepted_rows(end - len(rows), verdict.path)
                        self._moves.append((item.slot, *moved))
                    verdicts[i] = verdict
        return verdicts, forward_s

    def _skip_held(self, item: ForwardItem) -> ForwardItem:
        """A prefill from where its slot's record (the last prompt there) stops matching."""
        held = self.model.prefixes.reusable(item.slot, item.tokens) if item.reuse else 0
        self.reused_tokens += held
        return dataclasses.replace(item, start=held, tokens=item.tokens[held:])

    def forget_prefixes(self) -> None:
        self.model.prefixes.forget()  # the leader's records decide (_skip_held)

    def decide(self, decisions: list[tuple[int, Draft]]) -> list[Verdict]:
        """Verdicts on deferred rows: per session, the draft its rows decide on."""
        return [self._verify(s, *self._open_rows.pop(s), draft=d) for s, d in decisions]

    def stats(self) -> dict:
        return {"busy_s": self.busy_s, "steps": self.steps, "reused_tokens": self.reused_tokens}

    def calibrate(self, k: int, max_rows: int = 0) -> tuple[tuple[int, float], ...] | None:
        """This group's forwards of 1 to k + 1 rows (and up to max_rows: the chunks of a
        batch), timed (time_target); before any session uses slot 0."""
        return self.collective("_time_target", k, max_rows)

    def _time_target(self, k: int, max_rows: int) -> tuple[tuple[int, float], ...] | None:
        return time_target(self.model, k, max_rows=max_rows)

    # -- every rank ------------------------------------------------------------------------

    def run_forwards(
        self, forwards: list[_Forward], moves: list[tuple[int, list[int], list[int]]] = ()
    ) -> list[torch.Tensor]:
        model = self.model
        for slot, src, dst in moves:
            model.move_kv(slot, src, dst)
        return [
            model(f.tokens, f.pos, f.slots, last=1 if f.last_only else 0, tree=f.tree)
            for f in forwards
        ]

    # -- internals -------------------------------------------------------------------------

    def _verify(self, session: int, rows: torch.Tensor, pos: int, draft: Draft) -> Verdict:
        return verify(rows, draft, self._sampling[session], pos)

    def _plan(self, items: list[ForwardItem]) -> list[tuple[list[int], _Forward]]:
        plan = []
        short = []
        limit = self.model.prefill_rows()
        for i, item in enumerate(items):
            prompt = item.draft is not None and not len(item.draft) and len(item.tokens) > 1
            if prompt and limit:
                plan.extend(_prompt_forwards(i, item, limit))
                continue
            if len(item.tokens) <= ALONE_ABOVE:
                short.append(i)
                continue
            n = len(item.tokens)
            last_only = item.draft is not None and len(item.draft) == 0
            fwd = _Forward(
                torch.tensor([item.tokens]),
                torch.arange(item.start, item.start + n)[None],
                torch.tensor([item.slot]),
                last_only,
                _trees([item], n),
            )
            plan.append(([i], fwd))
        if short:
            width = max(len(items[i].tokens) for i in short)
            tokens = torch.zeros(len(short), width, dtype=torch.long)
            for b, i in enumerate(short):
                tokens[b, : len(items[i].tokens)] = torch.tensor(items[i].tokens)
            # padding continues past each row's positions (never read; within the cache, as
            # sessions end ALONE_ABOVE positions before it)
            pos = pad_positions([items[i].start for i in short], width)
            slots = torch.tensor([items[i].slot for i in short])
            trees = _trees([items[i] for i in short], width)
            plan.append((short, _Forward(tokens, pos, slots, last_only=False, tree=trees)))
        return plan


def _prompt_forwards(i: int, item: ForwardItem, rows: int) -> list[tuple[list[int], _Forward]]:
    """Item i, a prompt, alone in forwards of at most `rows` tokens (Transformer.prefill_rows:
    its K/V then do not depend on how it is split or what else is prefilled); the last one's
    row answers."""
    n, out = len(item.tokens), []
    for at in range(0, n, rows):
        piece = item.tokens[at : at + rows]
        pos = torch.arange(item.start + at, item.start + at + len(piece))[None]
        fwd = _Forward(torch.tensor([piece]), pos, torch.tensor([item.slot]), last_only=True)
        out.append(([i] if at + rows >= n else [], fwd))
    return out


def _is_prefill(item: ForwardItem) -> bool:
    return item.start == 0 and not item.defer and not len(item.draft)


def _next_step(item: ForwardItem, decoded: list[int]) -> ForwardItem:
    """The plain step after the tokens a multi-step item has decoded so far."""
    return ForwardItem(
        item.session, item.slot, item.start + len(decoded), decoded[-1:], draft=EMPTY_DRAFT
    )


def _trees(items: list[ForwardItem], width: int) -> torch.Tensor | None:
    """The attention of chunks right-padded to width where a draft is a token tree (None
    where none is: plain causal order)."""
    parents = [item.draft.parents if item.draft is not None else None for item in items]
    if not any(parents):
        return None
    pairs = zip(items, parents, strict=True)
    return torch.stack([tree.chunk_attention(len(i.tokens), p or [], width) for i, p in pairs])
