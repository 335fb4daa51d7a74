"""A local engine: load a target (and a drafter) once, then generate from text or token ids."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from distspec.models.llama import check_easyspec, easyspec_groups, pack_for_cpu
from distspec.models.loader import (
    LoadedModel,
    load_drafter_model,
    load_model,
    load_tokenizer,
)
from distspec.models.tensor_parallel import TPContext
from distspec.models.tokenizer import ChatMessage, StreamDecoder
from distspec.spec.decoding import SpeculativeDecoder, StepOutput
from distspec.spec.draft_policy import measure_costs
from distspec.spec.drafter import Drafter
from distspec.spec.drafters import ModelDrafter, NgramDrafter
from distspec.spec.pearl import PearlDecoder
from distspec.spec.sampling import SamplingParams
from distspec.workers.local_group import LocalGroup

log = logging.getLogger(__name__)

MODES = ("ar", "sd", "pearl")


class DrafterUnavailableError(ValueError):
    pass


@dataclass
class EngineConfig:
    target: str = "demo"
    mode: str = "sd"
    drafter: str = "demo"
    gamma: int = 4
    adaptive: bool = True  # gamma is then the longest draft; see DraftLengthPolicy
    lookup: bool = True  # model drafters start with prompt-lookup matches (ModelDrafter)
    max_len: int = 4096
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    easyspec_group: int = 0  # EasySpec: draft with fuzzy groups of this many layers (0: off)
    easyspec_exact: tuple[int, int] = (1, 1)  # EasySpec: first and last layers kept exact
    drafter_ranks: int = 1  # > 1: the drafter's fuzzy groups run over this many processes

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {self.gamma}")
        self.easyspec_exact = tuple(self.easyspec_exact)
        check_easyspec(self.easyspec_group, self.easyspec_exact)
        if self.drafter_ranks < 1:
            raise ValueError(f"drafter_ranks must be >= 1, got {self.drafter_ranks}")
        if self.drafter_ranks > 1 and not self.easyspec_group:
            raise ValueError("a drafter on several ranks needs an EasySpec group size (>= 2)")


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        dtype = getattr(torch, config.dtype)
        self.target = load_for_inference(config.target, config.device, dtype, config.max_len)
        self.tokenizer = self.target.tokenizer
        self._group: LocalGroup | None = None
        self.drafter = self._build_drafter(config) if config.mode != "ar" else None
        self.decoder = make_decoder(
            self.target, self.drafter, config.gamma, config.adaptive, pearl=config.mode == "pearl"
        )

    def _build_drafter(self, config: EngineConfig) -> Drafter:
        if config.drafter_ranks == 1:
            return build_drafter(
                config.drafter,
                self.target,
                config.max_len,
                config.lookup,
                config.easyspec_group,
                config.easyspec_exact,
            )
        from distspec.workers.drafter import DrafterSpec, DrafterWorker, WorkerDrafter

        spec = DrafterSpec(
            config.drafter,
            config.target,
            num_slots=1,
            max_len=config.max_len,
            lookup=config.lookup,
            device=config.device,
            dtype=config.dtype,
            parallel="layer",
            easyspec_group=config.easyspec_group,
            easyspec_exact=config.easyspec_exact,
        )
        self._group = LocalGroup(DrafterWorker, spec, config.drafter_ranks)
        return WorkerDrafter(self._group.leader)

    def close(self) -> None:
        """Stop the drafter's other ranks, if it has any."""
        if self._group is not None:
            self._group.close()
            self._group = None

    def encode(self, prompt: str, raw: bool) -> list[int]:
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        if raw:
            return self.tokenizer.encode(prompt)
        return self.tokenizer.encode_chat([ChatMessage("user", prompt)])

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[StepOutput]:
        return self.decoder.stream(prompt_ids, params)

    def stream_text(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> Iterator[tuple[str, StepOutput]]:
        decoder = StreamDecoder(self.tokenizer)
        for step in self.stream(prompt_ids, params):
            yield decoder.push(step.token_ids, final=step.finish_reason is not None), step


def load_for_inference(
    name: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_len: int = 4096,
    num_slots: int = 1,
    tp: TPContext | None = None,
) -> LoadedModel:
    """load_model, then pack weights for the CPU's fast small-batch kernels."""
    loaded = load_model(
        name, device=device, dtype=dtype, max_len=max_len, num_slots=num_slots, tp=tp
    )
    if torch.device(device).type == "cpu":
        pack_for_cpu(loaded.model)
    return loaded


def build_drafter(
    name: str,
    target: LoadedModel,
    max_len: int = 4096,
    lookup: bool = True,
    easyspec_group: int = 0,
    easyspec_exact: tuple[int, int] = (1, 1),
) -> Drafter:
    """ngram | demo | a model path (HF directory or .gguf) sharing the target's tokenizer.
    Model drafters go on the target's device, in its dtype; with `lookup` they follow prompt
    lookup matches of 2+ tokens first (see ModelDrafter); with `easyspec_group` N >= 2 they
    draft with EasySpec's fuzzy groups of N layers, in this process (easyspec_exact: the
    first and last layers kept exact)."""
    model = load_drafter(name, target, max_len)
    if easyspec_group and model is None:
        raise ValueError("EasySpec needs a model drafter, not ngram")
    groups = ()
    if easyspec_group:
        layers = model.model.config.num_hidden_layers
        groups = easyspec_groups(layers, easyspec_group, *easyspec_exact)
    return new_drafter(model, lookup, fuzzy_groups=groups)


def load_drafter(
    name: str,
    target: LoadedModel | str,
    max_len: int = 4096,
    num_slots: int = 1,
    tp: TPContext | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedModel | None:
    """The model of drafter `name` (None for ngram, which has none), for target: loaded, or
    its name when the drafter runs in a process of its own."""
    if name == "ngram":
        return None
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
) -> Drafter:
    """A drafter for one request at a time, drafting in KV slot `slot` of model
    (fuzzy_groups: EasySpec's layer groups, see ModelDrafter)."""
    if model is None:
        return NgramDrafter()
    ngram = NgramDrafter(min_ngram=2) if lookup else None
    return ModelDrafter(model.model, slot, lookup=ngram, fuzzy_groups=fuzzy_groups)


def make_decoder(
    target: LoadedModel,
    drafter: Drafter | None,
    gamma: int,
    adaptive: bool,
    pearl: bool = False,
) -> SpeculativeDecoder:
    """A decoder for target; with adaptive drafting, the draft costs are measured once here.
    pearl: PEARL's parallel drafting (gamma is then the longest draft, see pearl_gamma)."""
    costs = None
    if drafter is not None and adaptive:
        costs = measure_costs(target.model, drafter, gamma)
        log.info("draft costs: %s", costs)
    if pearl:
        if drafter is None:
            raise ValueError("PEARL needs a drafter")
        eos = target.tokenizer.eos_token_ids
        return PearlDecoder(target.model, drafter, gamma, eos, costs=costs)
    return SpeculativeDecoder(
        target.model,
        drafter,
        gamma,
        target.tokenizer.eos_token_ids,
        adaptive=adaptive,
        costs=costs,
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
