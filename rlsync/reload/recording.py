"""How a layer session's loader calls are recorded into a sync plan (`rlsync.reload.plan`).

Why a module of its own: the layer kinds (`rlsync.reload.layer`) share the
recorder through a `Slot`, store each loader call the same way (`record_call`),
and an arrival layer defers its calls while recording (`Deferred`); the
session (`rlsync.reload.session`) makes those deferred calls once vLLM's
`load_weights` of the group returned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from rlsync.reload.binding import Bound
from rlsync.reload.plan import Geometry, PlannedCall, Recorder, template


class Slot:
    """The recorder of the group being loaded right now, shared by one session's layers (None: not recording)."""

    def __init__(self) -> None:
        self.recorder: Recorder | None = None


def loading(slot: Slot, fn: Callable[[], Any]) -> Any:
    """Run one arrival loader call; while recording, with no dispatch mode (its mutations are the loader's).

    Left active, the recorder's watch would also run the plugin's compiled quantizers in eager mode
    (TorchDynamo does not compile under a Python dispatch mode).
    """
    if slot.recorder is None:
        return fn()
    with _disable_current_modes():
        return fn()


def record_call(slot: Slot, layer: str, pname: str, key: tuple, numel: int, bound: Bound,
                copies: list | None, src: tuple[str, torch.Tensor, Geometry] | None = None) -> PlannedCall | None:
    """Store one loader call for the incoming tensor its `loaded_weight` is a view of (or spoil the group);
    the stored call, None when spoiled or not recording.

    `src`: `Recorder.source_of(loaded_weight)` when the caller already looked it up."""
    rec = slot.recorder
    if rec is None:
        return None
    arguments = bound.arguments
    param, loaded = arguments["param"], arguments["loaded_weight"]
    if src is None:
        src = rec.source_of(loaded)
    templated = templates(*bound.split(), param, loaded)
    if src is None or templated is None:
        rec.spoil(f"{layer}.{pname}: its loader received a tensor that is no view of an incoming tensor")
        return None
    args, kwargs = templated
    named = {k: v for k, v in arguments.items() if k != "param" and k != "loaded_weight"}
    view = src[2]
    call = PlannedCall(layer=layer, pname=pname, key=key, numel=numel, loaded=view, args=args, kwargs=kwargs,
                       named=named, copies=None if copies is None else tuple(copies),
                       whole=view == (tuple(src[1].shape), src[1].stride(), 0))
    rec.add(src[0], call)
    return call


def templates(args: tuple, kwargs: dict[str, Any], param: torch.Tensor,
              loaded: torch.Tensor) -> tuple[tuple, dict[str, Any]] | None:
    """A loader call's positional and keyword arguments with `PARAM` / `LOADED` for those two tensors
    (`plan.template`), or None when another argument is a tensor."""
    out_args = template(args, param, loaded)
    values = template(tuple(kwargs.values()), param, loaded)
    return None if out_args is None or values is None else (out_args, dict(zip(kwargs, values, strict=True)))


@dataclasses.dataclass(frozen=True, slots=True)
class Deferred:
    """One arrival loader call a recording sync deferred until vLLM's `load_weights` of the group returned.

    Why: a loader that quantizes on arrival writes only its kernel tensors, so nothing vLLM does later in
    the group depends on its effect. Made after the group's plan is stored, the calls are replayed as a
    later sync replays them (a stack of experts as one quantizer call) instead of one quantization per
    expert under the recorder's dispatch mode: that is what made a first sync of 256-expert FP8 layers
    cost twice a sync without a plan. Only loaders that say what a call returns (`rlsync_deferred`)
    are deferred."""

    layer: Any
    """The `rlsync.reload.layer.ArrivalLayer` whose loader it is (`run_deferred` makes the call)."""
    pname: str
    key: tuple
    numel: int
    bound: Bound
    call: PlannedCall | None
    """The call as recorded (None: not plannable; the group is then made call by call, `run_deferred`)."""
