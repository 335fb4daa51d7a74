"""Self-speculation: a drafter built from the target's own weights, quantized.

The copy shares the target's tokenizer, needs no training and exists for every target; it
streams 4-8x fewer weight bytes per step than the fp32 target and agrees with it on nearly
every token. The target still verifies, so output stays exactly the target's.

| form | linear layers | output head | activations in the matmuls |
|---|---|---|---|
| int4 | int4, groups of 32 | int8 | int8 |
| int8 | int8 | int8 | int8 |
| bf16 | bf16 | bf16 | bf16 |

The head stays int8 under int4: most of int4's loss of agreement is in the (tied) output
head. Where the target came from a GGUF, tensors it stores in the form's own block format
(Q4_0/Q4_1 for int4, Q8_0 for int8) are taken bit for bit, others quantized from the fp
weights. The demo target is such a file (Q4_1 layers, Q8_0 embedding), so its int4 copy holds
exactly the target's weights: only the int8 rounding of activations and the order of the
sums differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distspec.models.linear import pack_for_cpu, set_activations
from distspec.models.loader import LoadedModel, load_model
from distspec.models.tensor_parallel import TPContext


@dataclass(frozen=True)
class SelfDraftForm:
    layers: str  # int4 | int8 | bf16
    head: str
    activations: str  # what quantized layers multiply: int8 | fp32


SELF_FORMS = {
    "int4": SelfDraftForm("int4", "int8", "int8"),
    "int8": SelfDraftForm("int8", "int8", "int8"),
    "bf16": SelfDraftForm("bf16", "bf16", "bf16"),
}
DEFAULT_FORM = "int4"  # the fastest on the demo target (docs/drafter.md)
SELF_NAMES = ("self", *(f"self-{f}" for f in SELF_FORMS))


def self_form(name: str) -> str | None:
    """The form a drafter name asks for ("self" -> the default), None if not a self drafter."""
    if name == "self":
        return DEFAULT_FORM
    if name.startswith("self-"):
        form = name.removeprefix("self-")
        if form not in SELF_FORMS:
            known = ", ".join(SELF_NAMES)
            raise ValueError(f"unknown self drafter {name!r} (expected one of {known})")
        return form
    return None


def load_self_drafter(
    target: LoadedModel | str,
    form: str,
    *,
    num_slots: int = 1,
    max_len: int = 4096,
    tp: TPContext | None = None,
    device: str | torch.device | None = None,
) -> LoadedModel:
    """A `form` copy of target (a loaded target, or its name for a drafter in a process of its
    own), on target's device unless told otherwise, with its own KV cache. In the target's
    process the copy reads the target's input embedding instead of holding a second one."""
    f = SELF_FORMS[form]
    source = target.source if isinstance(target, LoadedModel) else target
    if not source:
        raise ValueError("a self drafter needs the target's model name or path")
    if device is None:
        device = target.model.device if isinstance(target, LoadedModel) else "cpu"
    if f.layers == "bf16":
        loaded = load_model(
            source,
            device=device,
            dtype=torch.bfloat16,
            tp=tp,
            num_slots=num_slots,
            max_len=max_len,
        )
    else:
        loaded = load_model(
            source,
            device=device,
            tp=tp,
            num_slots=num_slots,
            max_len=max_len,
            weight_dtype=f.layers,
            head_dtype=f.head,
            exact_dtypes=True,
        )
        set_activations(loaded.model, f.activations)
        shared = isinstance(target, LoadedModel) and target.model.dtype == torch.float32
        if shared and target.model.device == loaded.model.device:
            loaded.model.share_embedding(target.model.embed)
    if loaded.model.device.type == "cpu":
        pack_for_cpu(loaded.model)
    loaded.copy_of = source
    return loaded
