"""Drafters by name: self (a quantized copy of the target: self, self-int4, self-int8,
self-bf16; see models/self_draft.py), demo (the small drafter trained for the demo target),
the model-free ngram (prompt lookup), suffix (suffix decoding) and recycle (Token Recycling),
or a model path sharing the target's tokenizer; loaded once, then one drafter per request."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from distspec.models.linear import pack_for_cpu
from distspec.models.llama import Transformer, easyspec_groups
from distspec.models.loader import LoadedModel, load_drafter_model, load_tokenizer
from distspec.models.self_draft import load_self_drafter, self_form
from distspec.models.tensor_parallel import TPContext
from distspec.spec_decode.defaults import SELF_PRIOR_ACCEPTANCE
from distspec.spec_decode.drafter import Drafter
from distspec.spec_decode.drafters.model import ModelDrafter
from distspec.spec_decode.drafters.ngram import NgramDrafter
from distspec.spec_decode.drafters.recycle import RecycleDrafter
from distspec.spec_decode.drafters.suffix import SuffixDrafter, SuffixStore

MODEL_FREE = ("ngram", "suffix", "recycle")


class DrafterUnavailableError(ValueError):
    pass


def build_drafter(
    name: str,
    target: LoadedModel,
    max_len: int = 4096,
    lookup: bool = True,
    easyspec_group: int = 0,
    easyspec_exact: tuple[int, int] = (1, 1),
    target_kv_slot: int | None = None,
    tree_width: int = 1,
) -> Drafter:
    """A drafter by name (DRAFTER_HELP in spec_decode/defaults.py). Model drafters go on the
    target's device (a path: in its dtype); with `lookup` they follow prompt lookup matches
    of 2+ tokens first (see ModelDrafter); with `easyspec_group` N >= 2 they draft with
    EasySpec's fuzzy groups of N layers, in this process (easyspec_exact: the first and last
    layers kept exact). target_kv_slot: the target's KV slot when it speculates
    sequentially there; a copy of the target then reads verified tokens' K/V from the
    target's cache (ModelDrafter's target_kv); other drafters ignore it. tree_width > 1:
    the drafter proposes token trees (not ngram)."""
    if name in MODEL_FREE:
        if easyspec_group:
            raise ValueError(f"EasySpec needs a model drafter, not {name}")
        return model_free_drafter(name, target.model.config.vocab_size, tree_width)
    model = load_drafter(name, target, max_len)
    groups = ()
    if easyspec_group:
        layers = model.model.config.num_hidden_layers
        groups = easyspec_groups(layers, easyspec_group, *easyspec_exact)
    target_kv = None
    if target_kv_slot is not None and model is not None and model.copy_of:
        target_kv = (target.model, target_kv_slot)
    return new_drafter(
        model, lookup, fuzzy_groups=groups, target_kv=target_kv, tree_width=tree_width
    )


def model_free_drafter(
    name: str, vocab_size: int, tree_width: int = 1, store: SuffixStore | None = None
) -> Drafter:
    """ngram, suffix (drafting also from the outputs in store, a new one if None: one per
    model and tenant, see SuffixStore) or recycle (its table learnt from the target's
    logits)."""
    if name == "suffix":
        return SuffixDrafter(SuffixStore() if store is None else store, tree_width)
    if name == "recycle":
        return RecycleDrafter(vocab_size, tree_width)
    if tree_width > 1:
        raise ValueError("ngram drafts chains only: trees need suffix, recycle or a model drafter")
    return NgramDrafter()


def load_drafter(
    name: str,
    target: LoadedModel | str,
    max_len: int = 4096,
    num_slots: int = 1,
    tp: TPContext | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedModel | None:
    """The model of drafter `name` (None for the model-free ones), for target: loaded, or
    its name when the drafter runs in a process of its own."""
    if name in MODEL_FREE:
        return None
    form = self_form(name)
    if form is not None:
        return load_self_drafter(
            target, form, num_slots=num_slots, max_len=max_len, tp=tp, device=device
        )
    if name == "demo":
        name = str(demo_drafter_dir())
    loaded = load_drafter_model(
        name, target, max_len=max_len, num_slots=num_slots, tp=tp, device=device, dtype=dtype
    )
    check_same_vocab(target, loaded)
    if loaded.model.device.type == "cpu":
        pack_for_cpu(loaded.model)
    return loaded


def new_drafter(
    model: LoadedModel | None,
    lookup: bool = True,
    slot: int = 0,
    fuzzy_groups: tuple[tuple[int, int], ...] = (),
    target_kv: tuple[Transformer, int] | None = None,
    tree_width: int = 1,
    name: str = "ngram",
    store: SuffixStore | None = None,
) -> Drafter:
    """A drafter for one request at a time, drafting in KV slot `slot` of model
    (fuzzy_groups: EasySpec's layer groups; target_kv and tree_width: see ModelDrafter), or
    without a model the model-free drafter `name` (ngram or suffix, with store: see
    model_free_drafter; recycle needs the target's logits, in this process: build_drafter)."""
    if model is None:
        if name == "recycle":
            raise ValueError(
                "recycle learns from the target's logits: it drafts beside a local "
                "target only (distspec generate, bench)"
            )
        return model_free_drafter(name, 0, tree_width, store)
    ngram = NgramDrafter(min_ngram=2) if lookup else None
    prior = SELF_PRIOR_ACCEPTANCE if model.copy_of else Drafter.prior_acceptance
    return ModelDrafter(
        model.model,
        slot,
        lookup=ngram,
        fuzzy_groups=fuzzy_groups,
        prior_acceptance=prior,
        target_kv=target_kv,
        check_lookup=bool(model.copy_of),  # a copy predicts the target better than a lookup
        tree_width=tree_width,
    )


def demo_drafter_dir() -> Path:
    """The drafter trained for the demo target (`distspec train-drafter`), shipped in-package."""
    path = Path(str(resources.files("distspec") / "assets" / "demo_drafter"))
    if not (path / "config.json").exists():
        raise DrafterUnavailableError(
            f"the demo drafter is missing from {path}; train one with `distspec train-drafter`"
        )
    return path


def check_same_vocab(target: LoadedModel | str, drafter: LoadedModel) -> None:
    if isinstance(target, str):
        tokenizer, tv = load_tokenizer(target)
    else:
        tokenizer, tv = target.tokenizer, target.model.config.vocab_size
    dv = drafter.model.config.vocab_size
    same = tv == dv and tokenizer.backend.get_vocab() == drafter.tokenizer.backend.get_vocab()
    if not same:
        raise ValueError(
            f"the drafter's vocabulary ({dv} tokens, {drafter.path}) differs from the target's "
            f"({tv} tokens): a drafter must share the target's tokenizer"
        )
