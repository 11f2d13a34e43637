"""PPO: a value head on the policy's last hidden state, GAE, clipped policy and value losses.

One step: each prompt gets `samples_per_prompt` completions from the FP8
engine; the task's sequence-level reward sits on the last completion token. The
KL penalty to the frozen reference is *in the reward* (InstructGPT / trl style):
token t earns `-kl_coef * (log p_old(t) - log p_ref(t))`, so the critic learns
to predict it and GAE spreads it like any other reward. Advantages come from
GAE(gamma, lambda) over completion tokens, whitened over the batch; the policy
loss is the clipped surrogate of `rlsync.rl.grpo.policy_loss` (with the same
truncated importance weight `is_cap` for the FP8-rollout / trainer mismatch),
the value loss PPO2's clipped squared error, both token means.

The value head is a separate `nn.Linear(hidden, 1)` (`ValueHead`), not part of
the Hugging Face model, so the weight sync never sees it. `value_trunk` says
whether the value loss trains the shared trunk (`shared`) or only the head
(`detached`, a linear probe on the policy's features).

Limitations:
1. Rewards are sequence-level; per-token task rewards would need the task API
   to return them.
2. Values are read at completion positions only; prompt positions carry none.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import nn

from rlsync.config.bounds import check_bounds
from rlsync.errors import ConfigError
from rlsync.rl.grpo import policy_loss
from rlsync.rl.logprobs import RolloutBatch, token_logprobs
from rlsync.rl.optim import check_optimizer
from rlsync.trainer.stepper import Stepper, TorchStepper, check_loss


@dataclasses.dataclass(kw_only=True, slots=True)
class PPOHParams:
    """PPO optimisation settings."""

    steps: int = 40
    """Policy steps (each: sample, update, sync)."""
    prompts_per_step: int = 16
    """Distinct prompts per step."""
    samples_per_prompt: int = 2
    """Completions sampled per prompt."""
    max_tokens: int = 12
    """Completion length limit."""
    temperature: float = 1.0
    """Sampling temperature (the trainer scores at the same temperature)."""
    lr: float = 1e-3
    """Policy learning rate."""
    value_lr: float = 1e-3
    """Value head learning rate."""
    weight_decay: float = 0.0
    """Weight decay (both optimizers)."""
    optimizer: str = "torch.optim.AdamW"
    """Optimizer class; only classes under `torch.optim` are accepted."""
    optimizer_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Extra optimizer arguments (e.g. betas), checked against the class signature."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (policy and value parameters together)."""
    epochs: int = 2
    """Passes over each step's batch."""
    num_minibatches: int = 2
    """Minibatches per pass (sequences shuffled with the torch RNG)."""
    clip_ratio: float = 0.2
    """PPO clip epsilon on the policy ratio."""
    value_clip: float = 0.2
    """Clip of the value update around the rollout-time value."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    gamma: float = 1.0
    """Discount per token."""
    lam: float = 0.95
    """GAE lambda."""
    kl_coef: float = 0.0
    """Per-token KL penalty to the initial policy, in the reward (0 = no reference model kept)."""
    is_cap: float | None = 2.0
    """Cap of the truncated importance weight p_trainer / p_engine; null disables the correction."""
    whiten_advantages: bool = True
    """Normalize advantages to zero mean, unit std over the batch's completion tokens."""
    value_trunk: Literal["shared", "detached"] = "detached"
    """`detached`: the value loss trains only the head; `shared`: also the policy's trunk."""

    def validate(self) -> None:
        for key in ("steps", "prompts_per_step", "samples_per_prompt", "max_tokens", "epochs", "num_minibatches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"ppo.{key} must be >= 1, got {getattr(self, key)}")
        if self.num_minibatches > self.prompts_per_step * self.samples_per_prompt:
            raise ConfigError(f"ppo.num_minibatches ({self.num_minibatches}) exceeds the sequences per step "
                              f"({self.prompts_per_step * self.samples_per_prompt})")
        check_bounds("ppo", self, PPO_BOUNDS)
        check_optimizer(self.optimizer, self.optimizer_kwargs, "ppo", self.weight_decay, lr=self.lr)


# The interval each number makes sense in (`rlsync.config.bounds`); NaN and infinities never pass.
PPO_BOUNDS = {
    "temperature": "(0, 10]", "lr": "(0, 1]", "value_lr": "(0, 1]", "weight_decay": "[0, 1]",
    "max_grad_norm": "(0, inf)", "clip_ratio": "(0, 1]", "value_clip": "(0, inf)", "vf_coef": "[0, inf)",
    "gamma": "[0, 1]", "lam": "[0, 1]", "kl_coef": "[0, 10]", "is_cap": "[1, inf)",
}


class ValueHead(nn.Module):
    """V(s_t) = w . h_t + b on the policy's last hidden state; starts at 0 everywhere."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def logprobs_and_values(model: nn.Module, head: ValueHead, batch: RolloutBatch, temperature: float,
                        detach_trunk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T-1] token log-probs and [B, T-1] values V(tokens <= t), in one forward."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    logp = torch.log_softmax(out.logits[:, :-1].float() / temperature, dim=-1)
    logp = logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    hidden = out.hidden_states[-1][:, :-1]
    values = head(hidden.detach() if detach_trunk else hidden)
    return logp, values


def token_rewards(batch: RolloutBatch, rewards: torch.Tensor, kl_coef: float = 0.0,
                  old_logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T-1]: the sequence reward on each row's last completion token, minus the per-token KL penalty."""
    mask = batch.completion_mask
    last = mask.cumsum(1).argmax(1)  # index of the last 1 in each row
    out = torch.zeros_like(mask)
    out[torch.arange(mask.shape[0]), last] = rewards.to(out.dtype) * (mask.sum(1) > 0)
    if kl_coef > 0:
        if old_logp is None or ref_logp is None:
            raise ValueError("kl_coef > 0 needs old_logp and ref_logp")
        out = out - kl_coef * (old_logp - ref_logp) * mask
    return out


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), [B, T-1], over each row's contiguous completion tokens; 0 elsewhere."""
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m
        advantages[:, t] = running
        next_value = values[:, t] * m
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * mask


def value_error(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """E[(V - R)^2] / E[R^2] over completion tokens: 1 for the zero critic the head starts as, 0 for a perfect one.

    Why not the raw value loss: it scales with the returns, which grow from
    ~0.08 to ~0.9 as the policy learns the tiny task, so a learning critic's raw
    loss can rise; relative to the zero critic it falls.
    """
    err = (((values - returns) * mask) ** 2).sum()
    return float(err / ((returns * mask) ** 2).sum().clamp(min=1e-12))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over completion tokens (1 = perfect, 0 = no better than the mean)."""
    n = mask.sum().clamp(min=1)

    def var(x: torch.Tensor) -> torch.Tensor:
        mean = (x * mask).sum() / n
        return (((x - mean) * mask) ** 2).sum() / n

    return float(1 - var(returns - values) / var(returns).clamp(min=1e-12))


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    """PPO2's clipped value loss: 0.5 * max((V - R)^2, (V_clipped - R)^2), token mean."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def _select(batch: RolloutBatch, idx: torch.Tensor) -> RolloutBatch:
    return RolloutBatch(**{f.name: getattr(batch, f.name)[idx] for f in dataclasses.fields(RolloutBatch)})


def ppo_update(model: nn.Module, head: ValueHead, optimizers: Stepper | list[torch.optim.Optimizer],
               batch: RolloutBatch, rewards: torch.Tensor, hp: PPOHParams, ref_model: nn.Module | None = None,
               *, step: int | None = None) -> dict[str, float]:
    """`hp.epochs` x `hp.num_minibatches` PPO steps on one batch; returns step metrics.

    `optimizers` is the trainer backend's `Stepper` (built by `rlsync.trainer.wrap`
    with the head as an `extra` module), or the policy's and the head's plain
    torch optimizers for models in one process. A non-finite loss or gradient
    norm raises `DivergenceError` naming `step` before any weight changes.
    """
    stepper = optimizers if isinstance(optimizers, Stepper) else TorchStepper(
        model, list(optimizers), max_grad_norm=hp.max_grad_norm, extra=[head])
    mask = batch.completion_mask
    detach = hp.value_trunk == "detached"
    with torch.no_grad():
        old_logp, old_values = logprobs_and_values(model, head, batch, hp.temperature, detach)
        ref_logp = token_logprobs(ref_model, batch, hp.temperature) if ref_model is not None else None
        per_token = token_rewards(batch, rewards, hp.kl_coef, old_logp, ref_logp)
        advantages, returns = gae(per_token, old_values, mask, hp.gamma, hp.lam)
        if hp.whiten_advantages:
            advantages = whiten(advantages, mask)
    n_tok = mask.sum()
    metrics: dict[str, float] = {
        "logprob_mismatch": float(((old_logp - batch.rollout_logprobs).abs() * mask).sum() / n_tok),
        "value_mean": float((old_values * mask).sum() / n_tok),
        "return_mean": float((returns * mask).sum() / n_tok),
        "value_error": value_error(old_values, returns, mask),
        "explained_variance": explained_variance(old_values, returns, mask),
    }
    if ref_logp is not None:
        metrics["kl"] = float(((old_logp - ref_logp) * mask).sum() / n_tok)
    sums = {"loss": 0.0, "policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0}
    num = 0
    for _ in range(hp.epochs):
        order = torch.randperm(mask.shape[0])
        for idx in order.chunk(hp.num_minibatches):
            mb = _select(batch, idx)
            logp, values = logprobs_and_values(model, head, mb, hp.temperature, detach)
            pg, stats = policy_loss(logp, old_logp[idx], advantages[idx], mb, hp)
            vl = value_loss(values, old_values[idx], returns[idx], mb.completion_mask, hp.value_clip)
            loss = pg + hp.vf_coef * vl
            sums["loss"] += check_loss(loss, step)
            stepper.zero_grad()
            stepper.backward(loss)
            grad_norm = stepper.step(train_step=step)
            for key, value in (("policy_loss", pg), ("value_loss", vl)):
                sums[key] += float(value.detach())
            sums["grad_norm"] += grad_norm
            sums["clip_fraction"] += stats["clip_fraction"]
            num += 1
    metrics.update({k: v / num for k, v in sums.items()})
    return metrics
