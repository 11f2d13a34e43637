"""GRPO with FP8 rollouts from a colocated vLLM engine, synced every step.

    rlsync run configs/grpo/tiny_cpu_fp8.yaml [key=value ...]

Each step samples `group_size` completions per prompt from the engine, scores
them with the task's reward, normalizes advantages within each group, takes a
policy step on the trainer model, and syncs the new weights into the engine
(which re-quantizes them to FP8). Metrics go to `<run dir>/metrics.jsonl`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

import torch
from tqdm import tqdm

from rlsync.engine import EngineConfig, VLLMEngine
from rlsync.errors import ConfigError
from rlsync.rl.grpo import GRPOHParams, group_advantages, grpo_update
from rlsync.rl.logprobs import make_batch
from rlsync.rl.run import RunConfig, RunDir
from rlsync.rl.tasks import TaskConfig, make_task
from rlsync.rl.trainer_model import ModelConfig, load_trainer_model


@dataclasses.dataclass(kw_only=True, slots=True)
class SyncConfig:
    """How often a sync also proves its result."""

    verify_every: int = 0
    """Verify every N-th sync bit for bit against the reference (0 = never)."""


@dataclasses.dataclass(kw_only=True, slots=True)
class GRPOConfig:
    """A GRPO run."""

    recipe: Literal["grpo"] = "grpo"
    """Which recipe this config is for."""
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    """Run directory and seed."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """Policy checkpoint (null path = the built-in tiny model)."""
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    """Rollout engine (its `model` comes from `model.path`)."""
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    """Synthetic task and reward."""
    grpo: GRPOHParams = dataclasses.field(default_factory=GRPOHParams)
    """Optimisation settings."""
    sync: SyncConfig = dataclasses.field(default_factory=SyncConfig)
    """Sync verification."""

    def validate(self) -> None:
        if self.engine.model:
            raise ConfigError("engine.model is set from model.path; leave it out of the config")


def main(cfg: GRPOConfig) -> RunDir:
    torch.manual_seed(cfg.run.seed)
    run = RunDir(cfg.run, cfg)
    policy, model_path, tokenizer = load_trainer_model(cfg.model)
    engine = VLLMEngine.from_config(dataclasses.replace(cfg.engine, model=model_path, seed=cfg.run.seed))
    task = make_task(cfg.task, seed=cfg.run.seed)
    hp = cfg.grpo
    reference = _frozen_copy(policy) if hp.kl_coef > 0 else None
    optimizer = torch.optim.AdamW(policy.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)

    bar = tqdm(range(1, hp.steps + 1), desc="grpo", unit="step")
    for step in bar:
        start = time.perf_counter()
        prompts = [tokenizer(p)["input_ids"] for p in task.prompts(hp.prompts_per_step)]
        results = engine.generate(prompts, n=hp.group_size, max_tokens=hp.max_tokens, temperature=hp.temperature)
        samples = [(r.prompt_token_ids, c) for r in results for c in r.completions]
        rewards = torch.tensor([task.reward(c.text) for _, c in samples])
        batch = make_batch([p for p, _ in samples], [c.token_ids for _, c in samples], [c.logprobs for _, c in samples])
        metrics = grpo_update(policy, optimizer, batch, group_advantages(rewards, hp.group_size), hp, reference)
        verify = cfg.sync.verify_every > 0 and step % cfg.sync.verify_every == 0
        report = engine.sync(policy, step=step, verify=verify)
        metrics.update(reward=float(rewards.mean()), step_seconds=time.perf_counter() - start, **report.metrics())
        run.log(step, metrics)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", sync_s=f"{report.seconds:.3f}")
    return run


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref
