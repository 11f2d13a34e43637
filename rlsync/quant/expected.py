"""What a processed layer's kernel tensors must hold: the verify reference, keyed by quant-method type.

`verify` (in `rlsync.engine`) proves a sync by recomputing, from the trainer's
checkpoint-format weight, the exact tensors a layer's kernel holds. How to do
that depends on the layer's quant method, so the answer lives with the
quantization code, never in the engine as class-name strings:
- rlsync's own methods (the `rlsync_fp8` plugin) answer themselves through an
  `expected_kernel_tensors(layer, weight_NK)` method (fused MoE experts:
  `expected_expert_tensors(layer, w13, w2)`);
- vLLM's methods are registered here by type (`register_reference`), with the
  types `rlsync.adapters.vllm_layers.quant_method_types` names (unquantized
  linear / embedding: the engine-dtype weight; vLLM's online per-channel FP8:
  the transposed e4m3 weight and its per-channel scales; unquantized fused
  experts: the stacked experts in the expert kernel's layout, from vLLM's own
  processing run on copies).
A method that is neither raises `UnknownQuantMethod` naming it: verify fails
loudly instead of skipping a layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from rlsync.adapters import vllm_layers, vllm_tp
from rlsync.errors import SyncError
from rlsync.quant import reference

Reference = Callable[[nn.Module, torch.Tensor], dict[str, torch.Tensor]]
"""fn(layer, weight_NK in the engine dtype) -> {kernel parameter name: expected tensor}."""
ExpertReference = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
"""fn(layer, w13 (E, 2I, H), w2 (E, H, I) in the engine dtype) -> {kernel parameter name: expected tensor}."""

_BY_TYPE: dict[type, Reference | None] = {}


class UnknownQuantMethod(SyncError):
    """No reference is known for a layer's quant method, so its tensors cannot be verified."""


def register_reference(method_type: type, fn: Reference | None) -> None:
    """Register how `method_type` stores a weight; None means "the engine-dtype weight, unchanged"."""
    _BY_TYPE[method_type] = fn


def _fp8_per_channel_online(layer: nn.Module, weight_NK: torch.Tensor) -> dict[str, torch.Tensor]:
    """vLLM's online per-channel FP8; under tensor parallelism a row-parallel shard's channel amax is the whole
    row's (vLLM all-reduces it over the TP group, so each shard has the unsharded model's scales)."""
    amax = vllm_tp.whole_row_amax(layer, reference.channel_amax(weight_NK))
    q_NK, scale_N1 = reference.fp8_per_channel(weight_NK, amax)
    return {"weight": q_NK.t(), "weight_scale": scale_N1}


def _register_vllm_types() -> None:
    types = vllm_layers.quant_method_types()
    for cls in vllm_layers.unquantized_method_types():
        _BY_TYPE.setdefault(cls, None)
    for cls in types["fp8_per_channel_online"]:
        _BY_TYPE.setdefault(cls, _fp8_per_channel_online)


def kernel_reference(method: object) -> Reference | None:
    """The reference for a layer's `quant_method`; None when its kernel keeps the engine-dtype weight.

    Raises `UnknownQuantMethod` for a method rlsync cannot recompute.
    """
    if method is None:
        return None
    own = getattr(method, "expected_kernel_tensors", None)
    if callable(own):
        return own
    _register_vllm_types()
    for cls in type(method).__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE[cls]
    raise UnknownQuantMethod(f"verify has no reference for quant method {type(method).__name__}")


def expert_reference(method: object) -> ExpertReference:
    """The reference for a fused MoE layer's `quant_method`; raises `UnknownQuantMethod` if rlsync has none."""
    own = getattr(method, "expected_expert_tensors", None)
    if callable(own):
        return own
    if isinstance(method, vllm_layers.quant_method_types()["unquantized_moe"]):
        return lambda layer, w13, w2: vllm_layers.expert_kernel_format(method, layer, w13, w2)
    raise UnknownQuantMethod(f"verify has no reference for the experts' quant method {type(method).__name__}")
