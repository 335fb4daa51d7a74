"""A small Llama-family model that shares the target's tokenizer, drafting autoregressively.

Optionally with prompt lookup: when the verified text ends with an n-gram seen before, what
followed it is read by the model in the same forward as the newly verified tokens, and the
model drafts on after it. Which of the looked-up tokens are kept depends on which predicts the
target better:
- a small trained drafter (`check_lookup` off): all of them. Small drafters copy poorly and
  copying is where a lookup is most often right (demo pair, positions with a >=2-token match:
  lookup right 71%, drafter 40%), and the lookup tokens cost no model step.
- a copy of the target (`check_lookup` on, set for self drafters): as far as the model agrees
  with them (its own choice at that position: argmax, or its draw with the request's race
  noise), and the model drafts on from the first it disagrees with, whose prediction that
  forward has already made. A draft is then exactly the model's own; a lookup that copies
  right saves model steps (m looked-up tokens cost one forward of m + 1 rows: on this CPU 9
  rows of the int4 demo copy cost 3.3 steps), and a wrong one no longer ends a 97%-agreeing
  drafter's draft early.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch

from distspec.models.llama import Transformer, pad_positions
from distspec.models.prefix_cache import common_prefix
from distspec.spec_decode.drafter import Draft, Drafter
from distspec.spec_decode.drafters.ngram import NgramDrafter
from distspec.spec_decode.sampling import SamplingParams, draw, probs_from_logits, race_noise
from distspec.spec_decode.tree import price_at


@dataclass(frozen=True)
class DraftForward:
    """One forward a draft needs: tokens read at positions start, ...; the logits of the last
    `last` of them are wanted; groups: EasySpec's fuzzy layer groups for it."""

    tokens: list[int]
    start: int
    groups: tuple[tuple[int, int], ...]
    last: int


def run_drafting(steps: Generator[DraftForward, torch.Tensor, Draft], forward) -> Draft:
    """Drive a drafting generator with forward(DraftForward) -> logits rows."""
    try:
        step = next(steps)
        while True:
            step = steps.send(forward(step))
    except StopIteration as done:
        return done.value


def forward_together(
    model: Transformer, batch: list[DraftForward], slots: torch.Tensor
) -> list[torch.Tensor]:
    """Each forward's wanted logits rows [last, V], from one (right-padded) forward; batch[b]
    in KV slot slots[b], all with the same fuzzy groups."""
    if len(batch) == 1:
        step = batch[0]
        t = torch.tensor([step.tokens])
        pos = torch.arange(step.start, step.start + len(step.tokens))[None]
        return [model(t, pos, slots, last=step.last, fuzzy_groups=step.groups)[0]]
    width = max(len(s.tokens) for s in batch)
    tokens = torch.zeros(len(batch), width, dtype=torch.long)
    for b, s in enumerate(batch):
        tokens[b, : len(s.tokens)] = torch.tensor(s.tokens)
    # padding writes K/V past each row's own positions, which are overwritten before they are
    # read (clamped at the cache's end, where they may spoil a draft, never the output)
    pos = pad_positions([s.start for s in batch], width).clamp(max=model.max_len - 1)
    logits = model(tokens, pos, slots, last=1 if width == 1 else 0, fuzzy_groups=batch[0].groups)
    return [logits[b, len(s.tokens) - s.last : len(s.tokens)] for b, s in enumerate(batch)]


class ModelDrafter(Drafter):
    name = "model"

    def __init__(
        self,
        model: Transformer,
        slot: int = 0,
        min_confidence: float = 0.0,
        lookup: NgramDrafter | None = None,
        fuzzy_groups: tuple[tuple[int, int], ...] = (),
        prior_acceptance: float = Drafter.prior_acceptance,
        target_kv: tuple[Transformer, int] | None = None,
        check_lookup: bool = False,
        tree_width: int = 1,
    ):
        """min_confidence: stop drafting after a token whose probability under the drafter is
        below this (an early stop on low confidence, as in SpecDec++ / SVIP).
        lookup: prompt lookup to follow first (see the module docstring).
        fuzzy_groups: EasySpec layer groups (models.llama.easyspec_groups) for the draft
        steps. The first forward of each draft, over the tokens verified since the last one,
        is exact and overwrites their fuzzy K/V: EasySpec's calibration, at no extra
        forward.
        check_lookup: keep looked-up tokens only as far as the model agrees with them (see
        the module docstring); for a model that predicts the target better than a lookup
        does (a copy of it). Otherwise every looked-up token is drafted.
        prior_acceptance: what the draft-length policy assumes before the first verdicts.
        target_kv: (target, its KV slot) for a copy of the target drafting beside it in
        sequential speculation: the K/V of verified tokens are copied from the target's
        cache, where its verification left them exact, instead of computed again (no
        prefill at start, one row fewer after a round whose drafts were all accepted; the
        draft then attends to the target's own K/V). The caller guarantees that when
        propose(context) is called the target's cache holds context[:-1].
        tree_width: > 1 drafts a tree: beside each token the model drafts, its next
        tree_width - 1 choices as leaves (runners-up by logit, or by race score when
        sampling), verified in the same target forward; a rejected chain token then often
        has the target's choice as a sibling. A leaf is kept where the model's chance of
        reaching it (its probabilities along the chain, times the leaf's) is at least the
        node price (price_nodes). The drafter's own forwards stay a chain."""
        if tree_width < 1:
            raise ValueError(f"tree_width must be >= 1, got {tree_width}")
        self.tree_width = tree_width
        self.prices: tuple[float, ...] = ()
        self.model = model
        self.prior_acceptance = prior_acceptance
        self.target_kv = target_kv
        self.check_lookup = check_lookup
        if target_kv is not None:
            _check_same_cache(model, target_kv[0])
        self.min_confidence = min_confidence
        self.lookup = lookup
        self.fuzzy_groups = tuple(fuzzy_groups)
        self.slot = torch.tensor([slot])
        self.cached: list[int] = []  # tokens whose K/V are in the drafter's cache, in order
        self.exact_upto = 0  # cached[:exact_upto] have exact K/V (the rest: fuzzy steps)
        self.params = SamplingParams()

    def stop_reading_target_kv(self) -> None:
        self.target_kv = None

    def start(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Also reads the prompt (all but its last token) into the drafter's cache now, so
        that the first draft costs what the others do: a round that also prefilled the
        drafter looks like a slow speculative round to whoever times rounds (the policy, the
        scheduler's speculation switch)."""
        self.cached = []
        self.exact_upto = 0
        head = prompt_ids[:-1][: self.model.max_len - 1]
        if head and self.target_kv is None:  # else the first draft copies the target's
            slot, prefixes = int(self.slot[0]), self.model.prefixes
            keep = prefixes.reusable(slot, head, limit=len(head))  # the slot's last prompt's
            if keep < len(head):
                self._forward(DraftForward(head[keep:], keep, (), 1))
            prefixes.hold(slot, head)
            self.cached, self.exact_upto = list(head), len(head)
        if not params.greedy and params.seed is None:
            raise ValueError("a sampled draft needs the request's seed (SamplingParams.seeded)")
        self.params = params
        if self.lookup is not None:
            self.lookup.start(prompt_ids, params)

    def finish(self) -> None:
        """The slot keeps what its cache holds exactly, for the next prompt to reuse."""
        self.model.prefixes.hold(int(self.slot[0]), self.cached[: self.exact_upto])

    def forget(self) -> None:
        self.model.prefixes.hold(int(self.slot[0]), [])

    def propose(self, context: list[int], k: int) -> Draft:
        return run_drafting(self.drafting(context, k), self._forward)

    def drafting(self, context: list[int], k: int) -> Generator[DraftForward, torch.Tensor, Draft]:
        """propose() as steps: yields each forward it needs, is sent that forward's logits
        rows, returns the draft (drafters/batched.py runs many of these in one forward)."""
        k = min(k, self.model.max_len - len(context))
        if k <= 0:
            return Draft([])
        keep = common_prefix(self.cached, context, limit=min(len(context) - 1, self.exact_upto))
        self.cached = context[:keep]
        if self.target_kv is not None and keep < len(context) - 1:
            self._copy_target_kv(keep, len(context) - 1)
            self.cached = context[:-1]
            self.exact_upto = len(self.cached)
        looked_up = self.lookup.propose(context, k).tokens if self.lookup is not None else []
        tokens: list[int] = []
        leaves: dict[int, list[int]] = {}  # chain index -> its siblings
        reach = 1.0  # the model's chance that the target accepts the chain so far
        pending = context[len(self.cached) :]  # fed to the model before its next prediction
        exact = True  # the first forward: verified tokens (and looked-up ones), exactly
        while len(tokens) < k:
            groups = () if exact else self.fuzzy_groups
            last = len(looked_up) + 1 if self.check_lookup else 1
            rows = yield DraftForward(pending + looked_up, len(self.cached), groups, last)
            kept = self._agreed(rows, looked_up, len(context) + len(tokens))
            tokens += looked_up[:kept]
            self.cached += pending + looked_up[:kept]  # K/V past them are overwritten later
            if exact or not self.fuzzy_groups:
                self.exact_upto = len(self.cached)
            exact = False
            if len(tokens) >= k:
                break
            # the row after the last kept token (unchecked, only the last row was computed)
            row = rows[kept - len(looked_up) - 1]
            tok, confidence = self._pick(row, len(context) + len(tokens))
            if self.tree_width > 1:
                nodes = len(tokens) + 1 + sum(map(len, leaves.values()))  # the next leaf's index
                at = len(context) + len(tokens)
                leaves[len(tokens)], q_tok = self._leaves(row, at, tok, reach, nodes)
                reach *= q_tok
            tokens.append(tok)
            if confidence < self.min_confidence:
                break
            pending, looked_up = [tok], []
        return _with_leaves(tokens, leaves)

    def reading(self, context: list[int]) -> Generator[DraftForward, torch.Tensor, Draft]:
        """drafting's catch-up alone: context[:-1] into the drafter's cache, no draft, so that
        a later draft after context starts from its last token (a server reads what its plain
        rounds verified this way, on the drafter's own compute, while the target steps)."""
        keep = common_prefix(self.cached, context, limit=min(len(context) - 1, self.exact_upto))
        self.cached = context[:keep]
        head = context[keep:-1][: max(0, self.model.max_len - 1 - keep)]
        if head and self.target_kv is None:
            yield DraftForward(head, keep, (), 1)
            self.cached = context[: keep + len(head)]
            self.exact_upto = len(self.cached)
        return Draft([])

    def _forward(self, step: DraftForward) -> torch.Tensor:
        return forward_together(self.model, [step], self.slot)[0]

    def _copy_target_kv(self, start: int, end: int) -> None:
        target, slot = self.target_kv
        mine = int(self.slot[0])
        self.model.prefixes.written(mine, start)
        for own, theirs in zip(self.model.layers, target.layers, strict=True):
            dst, src = own.attn.kv_cache, theirs.attn.kv_cache
            dst.k[mine, :, start:end] = src.k[slot, :, start:end]
            dst.v[mine, :, start:end] = src.v[slot, :, start:end]

    def _agreed(self, rows: torch.Tensor, looked_up: list[int], pos: int) -> int:
        """How many looked-up tokens to keep: all, or with check_lookup as many as the model
        would choose itself, in order (rows[i] predicts looked_up[i], at position pos + i)."""
        if not self.check_lookup:
            return len(looked_up)
        agree = (self._pick(rows[i], pos + i)[0] == tok for i, tok in enumerate(looked_up))
        return next((i for i, ok in enumerate(agree) if not ok), len(looked_up))

    def price_nodes(self, prices: tuple[float, ...]) -> None:
        self.prices = tuple(prices)

    def _leaves(self, logits, pos: int, chosen: int, reach: float, node: int):
        """(the leaves beside `chosen` at position pos: the model's next tree_width - 1
        choices, by logit or when sampling by race score, that pay the price of node `node`
        on; q(chosen)). Without a chance of paying (reach * (1 - q(chosen)) below the price:
        a confident step) no ranking is computed."""
        price = price_at(self.prices, node)
        if self.params.greedy:
            lse = torch.logsumexp(logits.float(), -1)
            q_tok = float(torch.exp(logits[chosen].float() - lse))
            if reach * (1 - q_tok) < price:
                return [], q_tok
            top = torch.topk(logits, self.tree_width)
            probs = torch.exp(top.values.float() - lse)
            pairs = zip(top.indices.tolist(), probs.tolist(), strict=True)
        else:
            q = probs_from_logits(logits, self.params).double()
            q_tok = float(q[chosen])
            if reach * (1 - q_tok) < price:
                return [], q_tok
            score = q / race_noise(self.params.seed, pos, q.shape[-1])
            idx = torch.topk(score, self.tree_width).indices
            pairs = zip(idx.tolist(), q[idx].tolist(), strict=True)
        kept = [t for t, p in pairs if t != chosen and reach * p >= price]
        return kept[: self.tree_width - 1], q_tok

    def _pick(self, logits: torch.Tensor, pos: int) -> tuple[int, float]:
        """(the model's token at position pos, its probability under the drafter)."""
        if self.params.greedy:
            tok = int(logits.argmax())
            conf = 1.0 if self.min_confidence <= 0 else float(torch.softmax(logits, -1)[tok])
            return tok, conf
        q = probs_from_logits(logits, self.params)
        tok = int(draw(q, self.params.seed, pos)[0])
        return tok, float(q[tok])


def _with_leaves(chain: list[int], leaves: dict[int, list[int]]) -> Draft:
    """The chain, with leaves[i] as siblings of chain[i] (a chain if there are none)."""
    if not leaves:
        return Draft(chain)
    tokens, parents = [], []
    prev = -1
    for i, tok in enumerate(chain):
        node = len(tokens)
        tokens.append(tok)
        parents.append(prev)
        for alt in leaves.get(i, ()):
            tokens.append(alt)
            parents.append(prev)
        prev = node
    return Draft(tokens, parents)


def _check_same_cache(model: Transformer, target: Transformer) -> None:
    def layout(m: Transformer):
        kc = m.layers[0].attn.kv_cache
        return len(m.layers), kc.k.shape[1], kc.k.shape[3], kc.k.device  # dtypes may differ

    if layout(model) != layout(target) or model.max_len > target.max_len:
        raise ValueError(
            f"target_kv: the drafter's KV cache (layers, heads, head dim, device: "
            f"{layout(model)}) is not laid out as the target's ({layout(target)})"
        )
