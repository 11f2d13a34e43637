"""PEFT/LoRA: yield merged base weights one group at a time, never the whole model.

Why: the engine serves the merged model (`W + scaling * B @ A`), but today's
tools merge by gathering the whole model and calling `merge_and_unload()`,
which runs out of memory on sharded trainers. Here a LoRA module's factors
travel in the same bucket as its base weight (so a sharded source gathers them
together), and the merged weight is computed out of place from the gathered
tensors: the trainer's weights are never written, so they are bit-identical
afterwards, and no writeback to shards is needed.

The arithmetic mirrors PEFT's `get_delta_weight` + default `merge` (fp32 on
CPU for half-precision factors, `fan_in_fan_out` transposition, the delta added
in place as PEFT does per layer type, adapters in `active_adapters` order), so the result
equals `merge_and_unload()` bit for bit on the same tensors (tested, fp32 and
bf16 base weights). PEFT's `safe_merge=True` rounds the delta first and can
differ in the last bit.

`modules_to_save`: the active adapter's trained copy is yielded under the
original module's name; the frozen original and inactive copies are not.

Limitations:
1. Plain LoRA on `Linear` and `Embedding` layers only. DoRA, `lora_bias`,
   LoRA variants, convolution/attention LoRA layers and other PEFT tuners
   (IA3, trainable tokens, ...) raise `ConfigError` rather than syncing
   unmerged weights.
2. A layer with its adapters disabled yields the base weight; a layer whose
   adapters were merged in place yields the base weight as is (it already
   holds the merge).
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from torch import nn

from rlsync.errors import ConfigError


@dataclasses.dataclass(kw_only=True, slots=True, frozen=True)
class Factor:
    """One adapter's low-rank update of one base weight."""

    a: str
    """Raw (trainer) name of the A factor."""
    b: str
    """Raw (trainer) name of the B factor."""
    scaling: float
    """PEFT's `scaling[adapter]` (lora_alpha / r, or rsLoRA's)."""
    transpose: bool
    """Transpose `B @ A` (Embedding, or Linear with `fan_in_fan_out`)."""
    half_on_cpu_dtype_from: str
    """Which factor's dtype PEFT checks for its fp32-on-CPU cast: "a" (Embedding) or "b" (Linear)."""
    round_delta_first: bool
    """Round the delta to the weight's dtype before adding (PEFT's Embedding merge does; Linear does not)."""


@dataclasses.dataclass(kw_only=True, slots=True)
class LoraPlan:
    """What LoRA changes about a model's parameters, by raw (trainer) name."""

    factors: dict[str, list[Factor]] = dataclasses.field(default_factory=dict)
    """Base weight name -> adapters to merge into it, in order."""
    skip: set[str] = dataclasses.field(default_factory=set)
    """Names that are never yielded (inactive `modules_to_save` copies)."""

    def __bool__(self) -> bool:
        return bool(self.factors or self.skip)


def lora_plan(model: nn.Module) -> LoraPlan:
    """Inspect `model` (any wrapping) for PEFT layers; an empty plan when PEFT is not in use."""
    plan = LoraPlan()
    if "peft" not in sys.modules:  # a model cannot hold PEFT layers unless PEFT was imported
        return plan
    from peft.tuners.lora import Embedding as LoraEmbedding
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(module, ModulesToSaveWrapper):
            _plan_modules_to_save(plan, prefix, module)
        elif isinstance(module, AuxiliaryTrainingWrapper):
            raise ConfigError(f"{path}: PEFT {type(module).__name__} is not supported by rlsync's LoRA merge")
        elif isinstance(module, (LoraLinear, LoraEmbedding)):
            factors = _layer_factors(path, prefix, module, embedding=isinstance(module, LoraEmbedding))
            if factors:
                plan.factors[f"{prefix}base_layer.weight"] = factors
        elif isinstance(module, BaseTunerLayer):
            raise ConfigError(
                f"{path}: PEFT layer {type(module).__name__} is not supported (plain LoRA on Linear/Embedding only)"
            )
    return plan


def _layer_factors(path: str, prefix: str, module: nn.Module, *, embedding: bool) -> list[Factor]:
    if module.disable_adapters:
        return []
    factors = []
    for adapter in module.active_adapters:
        if adapter in module.merged_adapters:
            continue  # already inside the base weight
        if module.use_dora.get(adapter, False) or module.lora_bias.get(adapter, False):
            raise ConfigError(f"{path}: adapter {adapter!r} uses DoRA or lora_bias, which rlsync cannot merge")
        if module.lora_variant.get(adapter) is not None:
            raise ConfigError(f"{path}: adapter {adapter!r} is a LoRA variant, which rlsync cannot merge")
        if embedding:
            if adapter not in module.lora_embedding_A:
                continue
            a, b = f"{prefix}lora_embedding_A.{adapter}", f"{prefix}lora_embedding_B.{adapter}"
            transpose, dtype_from, round_first = True, "a", True
        else:
            if adapter not in module.lora_A:
                continue
            a, b = f"{prefix}lora_A.{adapter}.weight", f"{prefix}lora_B.{adapter}.weight"
            transpose, dtype_from, round_first = bool(module.fan_in_fan_out), "b", False
        factors.append(Factor(
            a=a, b=b, scaling=float(module.scaling[adapter]), transpose=transpose, half_on_cpu_dtype_from=dtype_from,
            round_delta_first=round_first,
        ))
    return factors


def _plan_modules_to_save(plan: LoraPlan, prefix: str, wrapper: nn.Module) -> None:
    active = list(wrapper.active_adapters)
    if len(active) > 1:
        raise ConfigError(f"{prefix.rstrip('.')}: modules_to_save with several active adapters {active}")
    if not active or wrapper.disable_adapters:
        raise ConfigError(f"{prefix.rstrip('.')}: modules_to_save without an active adapter is not supported")
    for adapter, copy in wrapper.modules_to_save.items():
        if adapter != active[0]:
            plan.skip.update(f"{prefix}modules_to_save.{adapter}.{n}" for n, _ in copy.named_parameters())


def merged_weight(weight: torch.Tensor, factors: list[tuple[Factor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """`weight` plus each adapter's delta, out of place, in PEFT's arithmetic."""
    out = weight.detach().clone()
    for factor, a, b in factors:
        probe = a if factor.half_on_cpu_dtype_from == "a" else b
        cast_to_fp32 = probe.device.type == "cpu" and probe.dtype in (torch.float16, torch.bfloat16)
        if cast_to_fp32:
            a, b = a.float(), b.float()
        delta = b @ a
        if factor.transpose:
            delta = delta.T
        delta = delta * factor.scaling
        if cast_to_fp32:
            delta = delta.to(probe.dtype)
        # as PEFT's default (unsafe) merge: Linear adds with one rounding, Embedding rounds the delta first
        out += delta.to(out.dtype) if factor.round_delta_first else delta
    return out
