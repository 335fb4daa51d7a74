"""A local engine: load a target (and a drafter) once, then generate from text or token ids."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from distspec.models.llama import check_easyspec
from distspec.models.loader import (
    WEIGHT_DTYPES,
    LoadedModel,
    check_activations,
    load_for_inference,
)
from distspec.models.tokenizer import ChatMessage, StreamDecoder
from distspec.spec_decode.decoding import SpeculativeDecoder, StepOutput
from distspec.spec_decode.defaults import DEFAULT_DRAFTER, DEFAULT_GAMMA
from distspec.spec_decode.draft_policy import measure_costs
from distspec.spec_decode.drafter import Drafter
from distspec.spec_decode.drafters.factory import build_drafter
from distspec.spec_decode.mode_choice import choose_mode, measure_overlap
from distspec.spec_decode.pearl import PearlDecoder, pearl_gamma
from distspec.spec_decode.sampling import SamplingParams
from distspec.workers.local_group import LocalGroup
from distspec.workers.placement import PinnedDrafter, split_cpus

log = logging.getLogger(__name__)

MODES = ("ar", "sd", "pearl", "auto")  # auto: sd or pearl, measured (spec_decode/mode_choice.py)


@dataclass
class EngineConfig:
    target: str = "demo"
    mode: str = "sd"
    drafter: str = DEFAULT_DRAFTER
    gamma: int = DEFAULT_GAMMA
    adaptive: bool = True  # gamma is then the longest draft; see DraftLengthPolicy
    lookup: bool = True  # model drafters start with prompt-lookup matches (ModelDrafter)
    max_len: int = 4096
    device: str = "cpu"
    dtype: str = "float32"
    target_dtype: str = "fp32"  # the target's weights: fp32 (in dtype) | int8 | int4
    target_activations: str = "fp32"  # what a quantized target multiplies: fp32 | int8
    threads: int | None = None
    easyspec_group: int = 0  # EasySpec: draft with fuzzy groups of this many layers (0: off)
    easyspec_exact: tuple[int, int] = (1, 1)  # EasySpec: first and last layers kept exact
    drafter_ranks: int = 1  # > 1: the drafter's fuzzy groups run over this many processes
    # > 0: the drafter on a thread of its own pinned to the last this many cores, the target
    # pinned to the others (workers/placement.py); 0: both use every core, in turn
    drafter_cpus: int = 0
    tree_width: int = 1  # > 1: token trees, at most this many children per node (tree.py)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {self.gamma}")
        if self.target_dtype not in WEIGHT_DTYPES:
            raise ValueError(
                f"target dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {self.target_dtype!r}"
            )
        check_activations(self.target_activations)
        self.easyspec_exact = tuple(self.easyspec_exact)
        check_easyspec(self.easyspec_group, self.easyspec_exact)
        if self.drafter_ranks < 1:
            raise ValueError(f"drafter_ranks must be >= 1, got {self.drafter_ranks}")
        if self.drafter_ranks > 1 and not self.easyspec_group:
            raise ValueError("a drafter on several ranks needs an EasySpec group size (>= 2)")
        if self.drafter_cpus and (self.mode == "ar" or self.drafter_ranks > 1):
            raise ValueError("drafter cpus need a drafter in this process (not ar, one rank)")
        if self.tree_width < 1:
            raise ValueError(f"tree width must be >= 1, got {self.tree_width}")
        if self.tree_width > 1 and (self.mode == "pearl" or self.drafter_ranks > 1):
            raise ValueError("token trees run in mode sd or auto, with one drafter rank")


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        dtype = getattr(torch, config.dtype)
        self.target = load_for_inference(
            config.target,
            config.device,
            dtype,
            config.max_len,
            weight_dtype=config.target_dtype,
            quant_activations=config.target_activations,
        )
        self.tokenizer = self.target.tokenizer
        self._group: LocalGroup | None = None
        self.placement = split_cpus(config.drafter_cpus) if config.drafter_cpus else None
        self.drafter = self._build_drafter(config) if config.mode != "ar" else None
        if self.placement is not None:
            self.drafter = PinnedDrafter(self.drafter, self.placement.drafter)
        mode = "ar" if self.drafter is None else config.mode
        with self._on_target():  # costs and overlap are measured on the placement
            self.decoder = make_decoder(
                self.target,
                self.drafter,
                config.gamma,
                config.adaptive,
                mode,
                trees=config.tree_width > 1,
            )

    @property
    def mode(self) -> str:
        """The mode decoding runs in (what auto chose)."""
        if self.drafter is None:
            return "ar"
        return "pearl" if isinstance(self.decoder, PearlDecoder) else "sd"

    def _build_drafter(self, config: EngineConfig) -> Drafter:
        if config.drafter_ranks == 1:
            return build_drafter(
                config.drafter,
                self.target,
                config.max_len,
                config.lookup,
                config.easyspec_group,
                config.easyspec_exact,
                # sequential rounds leave the target's cache exact up to the drafter's
                # context (PEARL drafts past what the target has read; make_decoder turns
                # it off when auto chooses PEARL)
                target_kv_slot=0 if config.mode in ("sd", "auto") else None,
                tree_width=config.tree_width,
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
        """Stop the drafter's other ranks or its thread, if it has any."""
        if self._group is not None:
            self._group.close()
            self._group = None
        if isinstance(self.drafter, PinnedDrafter):
            self.drafter.close()

    def _on_target(self):
        return nullcontext() if self.placement is None else self.placement.on_target()

    def encode(self, prompt: str, raw: bool) -> list[int]:
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        if raw:
            return self.tokenizer.encode(prompt)
        return self.tokenizer.encode_chat([ChatMessage("user", prompt)])

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[StepOutput]:
        with self._on_target():
            yield from self.decoder.stream(prompt_ids, params)

    def stream_text(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> Iterator[tuple[str, StepOutput]]:
        decoder = StreamDecoder(self.tokenizer)
        for step in self.stream(prompt_ids, params):
            yield decoder.push(step.token_ids, final=step.finish_reason is not None), step


def make_decoder(
    target: LoadedModel,
    drafter: Drafter | None,
    gamma: int,
    adaptive: bool,
    mode: str = "sd",
    trees: bool = False,
    slot: int = 0,
) -> SpeculativeDecoder:
    """A decoder for target in mode ar, sd, pearl (gamma is then the longest draft, see
    pearl_gamma) or auto (sd or pearl, whichever the overlap measured here favours; sd for a
    drafter of token trees, which PEARL does not split), in the target's KV slot `slot`; with
    adaptive drafting, the draft costs are measured once here."""
    eos = target.tokenizer.eos_token_ids
    if drafter is None:
        if mode not in ("ar", "sd"):
            raise ValueError(f"mode {mode} needs a drafter")
        return SpeculativeDecoder(target.model, None, gamma, eos, slot=slot)
    costs = None
    if adaptive:
        costs = measure_costs(target.model, drafter, gamma)
        log.info("draft costs: %s", costs)
    if mode == "auto" and trees:
        mode = "sd"
    if mode == "auto":
        overlap = measure_overlap(target.model, drafter, pearl_gamma(costs, gamma))
        mode = choose_mode(overlap)
        log.info("mode auto: %s (%s)", mode, overlap)
    if mode == "pearl":
        drafter.stop_reading_target_kv()
        return PearlDecoder(target.model, drafter, gamma, eos, slot=slot, costs=costs)
    return SpeculativeDecoder(
        target.model, drafter, gamma, eos, slot=slot, adaptive=adaptive, costs=costs
    )
