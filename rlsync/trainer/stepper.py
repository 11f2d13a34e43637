"""backward / clip / step for each trainer backend, behind one small interface.

Why: the losses (`rlsync.rl.grpo`, `rlsync.rl.ppo`) are backend-agnostic, but
the step is not. Plain torch and DDP clip with `clip_grad_norm_` over local
full gradients; FSDP1 and FSDP2 hold gradient shards, so the norm needs the
wrapper's global reduction; a DeepSpeed engine owns backward, clipping (its
`gradient_clipping` setting) and the optimizer step. A `Stepper` hides that.

Modules outside the parallel wrapper (PPO's value head) are passed as `extra`:
their gradients are averaged over the ranks by one all-reduce before the step,
so every rank's copy stays identical; with torch backends they are clipped
together with the policy under one global norm, as in one process.

Divergence: a NaN or infinite gradient norm raises `DivergenceError` (naming
the training step when the caller passes it) *before* any optimizer steps, so
the weights, the next sync and any checkpoint never carry it; `check_loss`
does the same for the loss before backward. Both are scalars already computed
for the metrics, so the checks cost nothing extra.

Limitations:
1. Under DeepSpeed the policy is clipped by the engine and the `extra`
   modules separately, each to `max_grad_norm` (DeepSpeed does not expose its
   partitioned gradients for a joint norm); the reported norm is still the
   joint one, sqrt(policy^2 + extra^2), before clipping.
2. DeepSpeed's ZeRO-1/2 can skip its norm computation; the step then reports
   the norm as NaN.
3. DeepSpeed clips and steps inside `engine.step()`, so a non-finite policy
   gradient (with a finite loss) is only seen after its step: the run still
   stops with `DivergenceError` before the sync and the checkpoint, but the
   in-memory weights are already changed. A step DeepSpeed skipped itself
   (fp16 loss-scale overflow) is not a divergence.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from rlsync.errors import DivergenceError
from rlsync.trainer.dist import average_grads

NormKind = Literal["local", "fsdp1", "dtensor"]


class Stepper(abc.ABC):
    """One optimisation step of the trainer: `zero_grad`, `backward(loss)`, `step() -> grad norm`."""

    @abc.abstractmethod
    def zero_grad(self) -> None: ...

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def step(self, train_step: int | None = None) -> float:
        """Clip to `max_grad_norm`, step every optimizer; returns the global gradient norm before clipping.

        A non-finite norm raises `DivergenceError` (naming `train_step`) instead of stepping.
        """


def check_loss(loss: torch.Tensor, train_step: int | None = None) -> float:
    """The loss as a float; `DivergenceError` naming the step if it is NaN or infinite (call before backward)."""
    value = float(loss.detach())
    _check_finite(value, "the loss", train_step)
    return value


def _check_finite(value: float, what: str, train_step: int | None) -> None:
    if not math.isfinite(value):
        where = f"step {train_step}" if train_step is not None else "this step"
        raise DivergenceError(f"{where}: {what} is {value}; the run stops before this step is synced or "
                              f"checkpointed (lower the learning rate, or check the rewards and the data)")


def _grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


class TorchStepper(Stepper):
    """Plain torch optimizers: one process, DDP, FSDP1 or FSDP2 (`norm` says how the policy's norm is global)."""

    def __init__(self, model: nn.Module, optimizers: list[torch.optim.Optimizer], *, max_grad_norm: float,
                 extra: list[nn.Module] | None = None, norm: NormKind = "local") -> None:
        self.model = model
        self.optimizers = optimizers
        self.max_grad_norm = max_grad_norm
        self.extra = extra or []
        self.norm = norm
        # the optimizers' parameters, in their order (what one-process code clipped before)
        self.params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, train_step: int | None = None) -> float:
        average_grads(self.extra)
        if self.norm == "local":  # full gradients on every rank (DDP averaged them in backward)
            total = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        else:
            total = self._clip_sharded()
        _check_finite(total, "the gradient norm", train_step)  # the same global norm on every rank
        for opt in self.optimizers:
            opt.step()
        return total

    def _clip_sharded(self) -> float:
        extra_params = {id(p) for m in self.extra for p in m.parameters()}
        policy = [p for p in self.params if id(p) not in extra_params]
        extra = [p for p in self.params if id(p) in extra_params]
        if self.norm == "fsdp1":
            # FSDP1 reduces the shard norms itself; an infinite max leaves the gradients as they are
            policy_norm = float(self.model.clip_grad_norm_(math.inf))
        else:
            grads = _grads(policy)
            local = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            policy_norm = float(local.full_tensor() if hasattr(local, "full_tensor") else local)
        extra_grads = _grads(extra)
        extra_norm = float(torch.nn.utils.get_total_norm(extra_grads)) if extra_grads else 0.0
        total = math.sqrt(policy_norm**2 + extra_norm**2)
        if not math.isfinite(total):
            return total  # step() raises; scaling by a NaN coefficient would gain nothing
        coef = self.max_grad_norm / (total + 1e-6)  # as torch.nn.utils.clip_grad_norm_
        if coef < 1:
            for g in _grads(self.params):
                g.mul_(coef)
        return total


class DeepSpeedStepper(Stepper):
    """A DeepSpeed engine (ZeRO-2/3) for the policy, plain optimizers for `extra` modules (limitation 1)."""

    def __init__(self, engine, *, max_grad_norm: float, extra: list[nn.Module] | None = None,
                 extra_optimizers: list[torch.optim.Optimizer] | None = None) -> None:
        self.engine = engine
        self.max_grad_norm = max_grad_norm
        self.extra = extra or []
        self.extra_optimizers = extra_optimizers or []
        self.extra_params = [p for opt in self.extra_optimizers for g in opt.param_groups for p in g["params"]]

    def zero_grad(self) -> None:
        # the engine zeroes its own gradients in step(); a zero_grad before the first backward is a no-op there
        for opt in self.extra_optimizers:
            opt.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, train_step: int | None = None) -> float:
        average_grads(self.extra)
        extra_norm = 0.0
        if self.extra_params:
            extra_norm = float(torch.nn.utils.clip_grad_norm_(self.extra_params, self.max_grad_norm))
            _check_finite(extra_norm, "the gradient norm of the extra modules", train_step)
        self.engine.step()
        policy_norm = self.engine.get_global_grad_norm()
        # limitation 3: the engine has stepped already; an fp16 overflow it skipped (loss scaling) is no divergence
        if policy_norm is not None and self.engine.was_step_applied():
            _check_finite(float(policy_norm), "the policy's gradient norm", train_step)
        for opt in self.extra_optimizers:
            opt.step()
        if policy_norm is None:
            return math.nan
        return math.sqrt(float(policy_norm) ** 2 + extra_norm**2)
