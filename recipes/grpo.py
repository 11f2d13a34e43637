"""GRPO with FP8 rollouts from a colocated vLLM engine, synced every step.

    rlsync run configs/grpo/tiny_cpu_fp8.yaml [key=value ...]
    rlsync run configs/grpo/tiny_cpu_fp8.yaml resume=true      # continue from the last checkpoint
    torchrun --nproc_per_node 2 --no-python rlsync run configs/grpo/tiny_cpu_fsdp2.yaml   # trainer.backend: fsdp2

Each step samples `group_size` completions per prompt from the engine (seeded
by (run seed, step), so a resumed run samples what an uninterrupted one would),
scores them with the task's reward, normalizes advantages within each group,
takes the clipped policy step (with the truncated importance weight for the
FP8-engine / trainer mismatch and, if `kl_coef` > 0, a KL penalty to the frozen
initial policy), and syncs the new weights into the engine, which
re-quantizes them. Metrics go to `<run dir>/metrics.jsonl`, checkpoints to
`<run dir>/checkpoints/` every `run.checkpoint_every` steps, vLLM's log to
`<run dir>/run.log`; the run ends with a summary (`rlsync.rl.console`). A
resume of a run that is already complete says so and builds nothing.

Under a launcher (`trainer.backend` ddp / fsdp1 / fsdp2 / zero2 / zero3) every
rank joins the trainer's process group first, then builds its own colocated
engine; each rank samples its own prompts (seed + rank), the backend averages
the gradients, every rank syncs its engine from the sharded policy in lockstep,
and rank 0 logs the metrics averaged over the ranks.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

import torch
from tqdm import tqdm

from rlsync.engine import EngineConfig, VLLMEngine
from rlsync.errors import ConfigError
from rlsync.rl.checks import check_run
from rlsync.rl.grpo import GRPOHParams, group_advantages, grpo_update
from rlsync.rl.optim import build_optimizer
from rlsync.rl.console import run_console
from rlsync.rl.export import export_at_end
from rlsync.rl.resume import Checkpointer, is_complete, is_rank0
from rlsync.rl.rollout import SyncConfig, collect, source_config, sync_source
from rlsync.rl.run import RunConfig, RunDir, trainer_group
from rlsync.rl.state import TrainState, trainer_rank
from rlsync.rl.tasks import TaskConfig, make_task
from rlsync.rl.trainer_model import ModelConfig, frozen_copy, load_trainer_model, require_model_path, trainer_device
from rlsync.trainer import TrainerConfig, check_trainer_run, mean_over_ranks, wrap


@dataclasses.dataclass(kw_only=True, slots=True)
class GRPOConfig:
    """A GRPO run."""

    recipe: Literal["grpo"] = "grpo"
    """Which recipe this config is for."""
    resume: bool = False
    """Continue the run in `run.output_dir/run.name` from its newest complete checkpoint."""
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    """Run directory, seed, checkpoints, logging."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """Policy checkpoint (null path = the built-in tiny model)."""
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    """Rollout engine (its `model` comes from `model.path`, its `seed` from `run.seed`)."""
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    """Registered task (prompts and reward): `vowels`, `gsm8k`, or one your script registered."""
    grpo: GRPOHParams = dataclasses.field(default_factory=GRPOHParams)
    """Optimisation settings."""
    sync: SyncConfig = dataclasses.field(default_factory=SyncConfig)
    """Sync verification."""
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    """Trainer parallelism (single process, DDP, FSDP, ZeRO), LoRA, gather budget."""

    def validate(self) -> None:
        if self.engine.model:
            raise ConfigError("engine.model is set from model.path; leave it out of the config")
        check_run(self.model, self.engine, prompt_length=self.task.prompt_length, max_tokens=self.grpo.max_tokens,
                  section="grpo")
        check_trainer_run(self.trainer, checkpoint_every=self.run.checkpoint_every, resume=self.resume)


def main(cfg: GRPOConfig) -> RunDir:
    require_model_path(cfg.model)
    cfg.validate()  # again, now with the model's config.json on disk
    # the trainer's group first: vLLM sets up its own world of one in this process when the engine is built
    with (trainer_group(cfg.trainer), RunDir(cfg.run, cfg, resume=cfg.resume, writer=is_rank0()) as run,
          run_console(run, cfg.run)):  # vLLM's log to <run dir>/run.log, a summary at the end
        train(cfg, run)  # the run is closed (TensorBoard flushed) also when training raises
        export_at_end(run)  # run.export: the final checkpoint as a Hugging Face checkpoint, in the summary
    return run


def train(cfg: GRPOConfig, run: RunDir) -> None:
    """Build the trainer, the task and the engine, then run (or resume) the GRPO loop into `run`."""
    hp = cfg.grpo
    if cfg.resume and is_complete(run, hp.steps, key="grpo.steps"):
        return  # it says so; nothing is built
    torch.manual_seed(cfg.run.seed)
    policy, model_path, tokenizer = load_trainer_model(cfg.model)
    device = trainer_device(cfg.model)
    reference = frozen_copy(policy) if hp.kl_coef > 0 else None

    def make_optimizer(params):
        return build_optimizer(params, hp.optimizer, lr=hp.lr, weight_decay=hp.weight_decay,
                               kwargs=hp.optimizer_kwargs, section="grpo")

    trainer = wrap(policy, cfg.trainer, make_optimizer, max_grad_norm=hp.max_grad_norm)
    seed = cfg.run.seed + trainer_rank()  # each rank draws its own prompts and samples
    task = make_task(cfg.task, seed=seed, tokenizer=tokenizer)
    state = TrainState(modules={"policy": trainer.model}, optimizers=trainer.optimizers, task=task)
    engine = VLLMEngine(dataclasses.replace(cfg.engine, model=model_path, seed=cfg.run.seed,
                                            trust_remote_code=cfg.model.trust_remote_code))
    source = sync_source(trainer.model, source_config(cfg.engine, cfg.trainer), progress=cfg.run.progress and is_rank0())
    ckpt = Checkpointer(run, cfg.run, state)
    start = ckpt.resume(engine, source) if cfg.resume else ckpt.start()

    bar = tqdm(range(start + 1, hp.steps + 1), desc="grpo", unit="step", disable=not (cfg.run.progress and is_rank0()))
    for step in bar:
        t0 = time.perf_counter()
        rollout = collect(engine, task, tokenizer, num_prompts=hp.prompts_per_step, n=hp.group_size,
                          max_tokens=hp.max_tokens, temperature=hp.temperature, seed=seed, step=step,
                          device=device)
        advantages = group_advantages(rollout.rewards, hp.group_size)
        metrics = grpo_update(trainer.model, trainer.stepper, rollout.batch, advantages, hp, reference, step=step)
        verify = cfg.sync.verify_every > 0 and step % cfg.sync.verify_every == 0
        report = engine.sync(source, step=step, verify=verify)
        metrics.update(reward=float(rollout.rewards.mean()), **task.step_metrics(),
                       step_seconds=time.perf_counter() - t0, **report.metrics())
        metrics = mean_over_ranks(metrics)
        run.log(step, metrics)
        ckpt.maybe_save(step, final=step == hp.steps)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", sync_s=f"{report.seconds:.3f}")
