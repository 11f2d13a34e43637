"""`source_for(model)`: the `WeightSource` that fits how a trainer wrapped its model.

One decision, made from the model object itself, so a recipe, trl or an
Accelerate-prepared model (which is a DDP / FSDP / DeepSpeed engine / plain
module after `prepare`) all get the same answer:

- a `WeightSource`: returned as is;
- a DeepSpeed engine: ZeRO-3 -> `Zero3Source(engine.module)`, ZeRO-0/1/2 ->
  `ModuleSource(engine.module)` (full parameters on every rank);
- DDP: `ModuleSource(model.module)`;
- any `FullyShardedDataParallel` unit inside: `FSDP1Source`;
- DTensor parameters (`fully_shard`): `FSDP2Source`;
- ZeRO-3 parameters outside an engine (`zero.Init`): `Zero3Source`;
- otherwise `ModuleSource`.
PEFT/LoRA is detected inside each of them (`lora.lora_plan`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from rlsync.source.base import SourceConfig, WeightSource
from rlsync.source.fsdp import FSDP1Source, FSDP2Source, is_fsdp1, is_fsdp2
from rlsync.source.plain import ModuleSource
from rlsync.source.zero import Zero3Source, has_zero3_params, is_deepspeed_engine


def source_for(model: nn.Module | WeightSource, config: SourceConfig | None = None, /, **options: Any) -> WeightSource:
    """The `WeightSource` for `model`, built from `config` (or its fields as `options`: dtype, bucket_bytes, timeout_s)."""
    if isinstance(model, WeightSource):
        return model
    if config is not None:
        if options:
            raise ValueError(f"pass a SourceConfig or its keys, not both ({sorted(options)})")
        options = {"dtype": config.dtype, "bucket_bytes": config.bucket_bytes, "timeout_s": config.timeout_s}
    if not isinstance(model, nn.Module):
        raise TypeError(f"source_for expects an nn.Module or a WeightSource, got {type(model).__name__}")
    if is_deepspeed_engine(model):
        inner = model.module
        if model.zero_optimization_stage() == 3:
            return Zero3Source(inner, **options)
        return ModuleSource(inner, **options)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return ModuleSource(model.module, **options)
    if is_fsdp1(model):
        return FSDP1Source(model, **options)
    if is_fsdp2(model):
        return FSDP2Source(model, **options)
    if has_zero3_params(model):
        return Zero3Source(model, **options)
    return ModuleSource(model, **options)
