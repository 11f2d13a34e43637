"""`wrap(policy, cfg, make_optimizer)`: the policy as `trainer.backend` holds it, with its optimizer and stepper.

The recipe loads a plain Hugging Face model on every rank (same seed, same
weights), then calls `wrap`, which applies LoRA (PEFT) if configured and then
the backend:
- single: the model as is;
- ddp: `DistributedDataParallel`;
- fsdp1: `FullyShardedDataParallel` per decoder layer (`use_orig_params`);
- fsdp2: `fully_shard` per decoder layer, then the root;
- zero2 / zero3: `deepspeed.initialize` with the recipe's torch optimizer and
  `gradient_clipping = max_grad_norm`, merged with `trainer.deepspeed`.
Decoder layers are found by the model's `_no_split_modules` class names (the
Hugging Face convention). Whatever comes out, `source_for(trainer.model)`
picks the matching weight source, so the engine sync needs no backend code.

Limitations:
1. The whole model is loaded on every rank before sharding (no meta-device
   or `zero.Init` construction): fine for models that fit one host's memory
   per rank, which colocated engines need anyway.
2. A bf16 policy under DeepSpeed needs `trainer.deepspeed: {bf16: {enabled:
   true}}`; only fp32 policies are exercised on CPU.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

from rlsync.trainer.config import LoraOptions, TrainerConfig
from rlsync.trainer.stepper import DeepSpeedStepper, Stepper, TorchStepper

MakeOptimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclasses.dataclass(kw_only=True, slots=True)
class Trainer:
    """The wrapped policy, its optimizer and the step that fits them."""

    model: nn.Module
    """What the loss calls and `source_for` syncs: plain, DDP, FSDP or a DeepSpeed engine."""
    optimizer: torch.optim.Optimizer | None
    """The policy's torch optimizer; None under DeepSpeed, whose engine owns it."""
    stepper: Stepper
    """backward / clip / step for this backend (covers the `extra` modules too)."""

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The policy's optimizer by name, for `TrainState` (empty under DeepSpeed)."""
        return {"policy": self.optimizer} if self.optimizer is not None else {}


def apply_lora(model: nn.Module, opts: LoraOptions) -> nn.Module:
    """PEFT LoRA adapters on `opts.target_modules` (the model itself when `opts.r` is 0)."""
    if opts.r == 0:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
                        target_modules=list(opts.target_modules))
    return get_peft_model(model, config)


def layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The decoder-layer classes of a Hugging Face model (its `_no_split_modules`), found among its modules."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def _layers(model: nn.Module) -> list[nn.Module]:
    classes = layer_classes(model)
    if not classes:
        warnings.warn(f"{type(model).__name__} names no _no_split_modules; sharding it as one unit", stacklevel=3)
    return [m for m in model.modules() if type(m) in classes]


def wrap(policy: nn.Module, cfg: TrainerConfig, make_optimizer: MakeOptimizer, *, max_grad_norm: float,
         extra: list[nn.Module] | None = None,
         extra_optimizers: list[torch.optim.Optimizer] | None = None) -> Trainer:
    """Apply LoRA and `cfg.backend` to `policy`; build its optimizer over the trainable parameters.

    `extra` are modules outside the wrapper that train with the policy (a value
    head) and `extra_optimizers` their optimizers: the stepper averages their
    gradients over the ranks and steps them with the policy.
    """
    extra, extra_optimizers = extra or [], extra_optimizers or []
    model = apply_lora(policy, cfg.lora)
    device = next(model.parameters()).device
    if cfg.is_deepspeed:
        return _deepspeed(model, cfg, make_optimizer, max_grad_norm, extra, extra_optimizers)
    norm = "local"
    if cfg.backend == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    elif cfg.backend == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        model = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy(layer_classes(model)),
                                         use_orig_params=True, device_id=device)
        norm = "fsdp1"
    elif cfg.backend == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in _layers(model):
            fully_shard(layer)
        fully_shard(model)
        norm = "dtensor"
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
    stepper = TorchStepper(model, [optimizer, *extra_optimizers], max_grad_norm=max_grad_norm, extra=extra,
                           norm=norm)
    return Trainer(model=model, optimizer=optimizer, stepper=stepper)


def deepspeed_config(cfg: TrainerConfig, max_grad_norm: float) -> dict:
    """The generated DeepSpeed config (one micro-batch per step, the recipe's clip), with `cfg.deepspeed` merged in."""
    base = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": {"stage": 3 if cfg.backend == "zero3" else 2},
        "zero_allow_untested_optimizer": True,  # the recipe's torch.optim class
        "steps_per_print": 2**31 - 1,
    }
    return _merge(base, cfg.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _deepspeed(model: nn.Module, cfg: TrainerConfig, make_optimizer: MakeOptimizer, max_grad_norm: float,
               extra: list[nn.Module], extra_optimizers: list[torch.optim.Optimizer]) -> Trainer:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, max_grad_norm))
    stepper = DeepSpeedStepper(engine, max_grad_norm=max_grad_norm, extra=extra, extra_optimizers=extra_optimizers)
    return Trainer(model=engine, optimizer=None, stepper=stepper)
