"""GRPO: group-normalized advantages and the clipped policy loss.

One step: for each prompt, `group_size` completions are sampled from the FP8
engine; each completion's advantage is its reward minus the group mean, divided
by the group std. The policy loss is PPO's clipped surrogate per token, with two
optional terms FP8 rollouts want:
- truncated importance sampling (`is_cap`): the engine samples from the FP8
  policy, the trainer differentiates the bf16/fp32 one; weighting each token by
  min(p_trainer / p_engine, cap) corrects the mismatch with bounded variance;
- a KL penalty to a frozen reference model (`kl_coef`, k3 estimator).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from rlsync.config.bounds import check_bounds
from rlsync.errors import ConfigError
from rlsync.rl.logprobs import RolloutBatch, token_logprobs
from rlsync.rl.optim import check_optimizer
from rlsync.trainer.stepper import Stepper, TorchStepper, check_loss


@dataclasses.dataclass(kw_only=True, slots=True)
class GRPOHParams:
    """GRPO optimisation settings."""

    steps: int = 40
    """Policy steps (each: sample, update, sync)."""
    prompts_per_step: int = 8
    """Distinct prompts per step."""
    group_size: int = 8
    """Completions sampled per prompt (the group advantages are normalized over)."""
    max_tokens: int = 12
    """Completion length limit."""
    temperature: float = 1.0
    """Sampling temperature (the trainer scores at the same temperature)."""
    lr: float = 5e-4
    """Learning rate."""
    weight_decay: float = 0.0
    """Weight decay."""
    optimizer: str = "torch.optim.AdamW"
    """Optimizer class; only classes under `torch.optim` are accepted."""
    optimizer_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Extra optimizer arguments (e.g. betas), checked against the class signature."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    updates_per_step: int = 1
    """Gradient steps on each batch (>1 makes the clip ratio matter)."""
    clip_ratio: float = 0.2
    """PPO clip epsilon on the policy ratio."""
    kl_coef: float = 0.0
    """KL penalty to the initial policy (0 = no reference model is kept)."""
    is_cap: float | None = 2.0
    """Cap of the truncated importance weight p_trainer / p_engine; null disables the correction."""

    def validate(self) -> None:
        for key in ("steps", "prompts_per_step", "max_tokens", "updates_per_step"):
            if getattr(self, key) < 1:
                raise ConfigError(f"grpo.{key} must be >= 1, got {getattr(self, key)}")
        if self.group_size < 2:
            raise ConfigError(f"grpo.group_size must be >= 2 (advantages need a group), got {self.group_size}")
        check_bounds("grpo", self, GRPO_BOUNDS)
        check_optimizer(self.optimizer, self.optimizer_kwargs, "grpo", self.weight_decay, lr=self.lr)


# The interval each number makes sense in (`rlsync.config.bounds`); NaN and infinities never pass.
GRPO_BOUNDS = {
    "temperature": "(0, 10]", "lr": "(0, 1]", "weight_decay": "[0, 1]", "max_grad_norm": "(0, inf)",
    "clip_ratio": "(0, 1]", "kl_coef": "[0, 10]", "is_cap": "[1, inf)",
}


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean_group) / (std_group + eps) for rewards laid out group by group."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    adv = (grouped - grouped.mean(dim=1, keepdim=True)) / (grouped.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    batch: RolloutBatch,
    hp: GRPOHParams,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean clipped surrogate (+ IS weights, + KL); returns loss and stats.

    `advantages` is [B] (one per sequence, GRPO) or [B, T-1] (per token, PPO);
    `hp` is any settings object with `clip_ratio`, `is_cap` and `kl_coef`.
    """
    mask = batch.completion_mask
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - hp.clip_ratio, 1 + hp.clip_ratio) * adv)
    if hp.is_cap is not None:
        is_weight = torch.exp(old_logp - batch.rollout_logprobs).clamp(max=hp.is_cap).detach()
        surrogate = surrogate * is_weight
    per_token = -surrogate
    stats: dict[str, float] = {}
    if ref_logp is not None and hp.kl_coef > 0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1  # k3: unbiased, non-negative
        per_token = per_token + hp.kl_coef * kl
        stats["kl"] = float((kl * mask).sum() / mask.sum())
    loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    clipped = ((ratio - 1).abs() > hp.clip_ratio).float()
    stats["clip_fraction"] = float((clipped * mask).sum() / mask.sum())
    return loss, stats


def grpo_update(
    model: torch.nn.Module,
    optimizer: Stepper | torch.optim.Optimizer,
    batch: RolloutBatch,
    advantages: torch.Tensor,
    hp: GRPOHParams,
    ref_model: torch.nn.Module | None = None,
    *,
    step: int | None = None,
) -> dict[str, float]:
    """`hp.updates_per_step` gradient steps on one batch; returns metrics of the first.

    `optimizer` is the trainer backend's `Stepper` (`rlsync.trainer.wrap`), or a
    plain torch optimizer for a model in one process. A non-finite loss or
    gradient norm raises `DivergenceError` naming `step` before any weight changes.
    """
    stepper = optimizer if isinstance(optimizer, Stepper) else TorchStepper(
        model, [optimizer], max_grad_norm=hp.max_grad_norm)
    mask = batch.completion_mask
    with torch.no_grad():
        old_logp = token_logprobs(model, batch, hp.temperature)
        ref_logp = token_logprobs(ref_model, batch, hp.temperature) if ref_model is not None else None
    mismatch = ((old_logp - batch.rollout_logprobs).abs() * mask).sum() / mask.sum()
    metrics: dict[str, float] = {"logprob_mismatch": float(mismatch)}
    for i in range(hp.updates_per_step):
        logp = token_logprobs(model, batch, hp.temperature)
        loss, stats = policy_loss(logp, old_logp, advantages, batch, hp, ref_logp)
        loss_value = check_loss(loss, step)
        stepper.zero_grad()
        stepper.backward(loss)
        grad_norm = stepper.step(train_step=step)
        if i == 0:
            metrics.update(loss=loss_value, grad_norm=float(grad_norm), **stats)
    return metrics
