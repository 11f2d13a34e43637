"""trl's `GRPOTrainer` with FP8 colocated rollouts through `RLSyncCallback`.

    rlsync run configs/trl/grpo_tiny_cpu_fp8.yaml [key=value ...]

The same tasks as `recipes/grpo.py` (`task.name`: the vowels reward on the
built-in tiny model by default, `gsm8k`, or one your script registered; the
task's reward functions are trl's `reward_funcs`), trained by trl instead of
rlsync's own loop: trl samples from the
rlsync engine (FP8), corrects the rollout/trainer mismatch with its importance
sampling, and the callback syncs every step in layer groups. trl's log
history (with the `sync/...` metrics) is appended to `<run dir>/metrics.jsonl`.

Checkpoints are transformers' own, `<run dir>/trl/checkpoint-N` (weights in the
trainer's dtype, or the LoRA adapter, plus trl's optimizer and trainer state),
every `run.checkpoint_every` steps and after the last, the newest
`run.keep_checkpoints` kept. `rlsync export RUN_DIR OUT` (or `run.export`)
turns one into the base model's format, LoRA merged. A fresh run refuses a
run directory that already holds such checkpoints (`run.overwrite` starts over).

What it does not do: expose every trl option as a typed key; `trl.extra_args`
passes any other `GRPOConfig` field through, and trl validates it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import TrainerCallback

from rlsync.config.bounds import check_bounds
from rlsync.errors import ConfigError
from rlsync.integrations.trl import RLSyncCallback, RLSyncConfig
from rlsync.rl.console import command_console
from rlsync.rl.export import TRL_DIR, export_at_end, trl_checkpoints
from rlsync.rl.run import RunConfig, RunDir
from rlsync.rl.tasks import TaskConfig, make_task
from rlsync.rl.trainer_model import ModelConfig, load_trainer_model, require_model_path


@dataclasses.dataclass(kw_only=True, slots=True)
class TrlArgs:
    """The trl `GRPOConfig` fields this recipe sets (trl's names; others keep trl's defaults)."""

    max_steps: int = 40
    """Optimizer steps."""
    num_prompts: int = 512
    """Task prompts in the training dataset (drawn from the task: random ones, or records in a shuffled order)."""
    per_device_train_batch_size: int = 16
    """Completions per step (num_generations per prompt)."""
    num_generations: int = 8
    """Completions sampled per prompt (the GRPO group)."""
    max_completion_length: int = 12
    """Tokens sampled per completion."""
    temperature: float = 1.0
    """Sampling temperature (the engine reports log-probs after it)."""
    learning_rate: float = 5e-4
    """AdamW learning rate."""
    beta: float = 0.0
    """KL coefficient (0 = no reference model)."""
    loss_type: str = "dapo"
    """trl's GRPO loss aggregation."""
    vllm_importance_sampling_correction: bool = True
    """Reweight by trainer / FP8-engine probabilities of the sampled tokens (keep on with FP8)."""
    vllm_importance_sampling_mode: str = "token_truncate"
    """How the ratio is applied: token_truncate, token_mask, sequence_truncate, sequence_mask."""
    vllm_importance_sampling_clip_max: float = 2.0
    """Upper clip (truncate modes) or mask threshold (mask modes) of the ratio."""
    vllm_enable_sleep_mode: bool = False
    """Release engine memory while training (needs a GPU build of vLLM)."""
    vllm_max_model_length: int = 128
    """Longest prompt + completion the engine serves."""
    logging_steps: int = 1
    """Log (and average metrics) every N steps."""
    extra_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Any other trl `GRPOConfig` field, passed through as is."""


@dataclasses.dataclass(kw_only=True, slots=True)
class LoraArgs:
    """Optional LoRA adapters (peft) instead of full fine-tuning."""

    r: int = 0
    """LoRA rank; 0 = full fine-tuning."""
    alpha: int = 16
    """LoRA alpha (scaling = alpha / r)."""
    target_modules: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names that get adapters."""


@dataclasses.dataclass(kw_only=True, slots=True)
class TrlGRPOConfig:
    """A trl GRPO run with rlsync's engine."""

    recipe: Literal["trl_grpo"] = "trl_grpo"
    """Which recipe this config is for."""
    run: RunConfig = dataclasses.field(default_factory=lambda: RunConfig(name="trl-grpo-tiny"))
    """Run directory and seed."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """Policy checkpoint (null path = the built-in tiny model)."""
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    """Registered task (prompts and reward): `vowels`, `gsm8k`, or one your script registered."""
    trl: TrlArgs = dataclasses.field(default_factory=TrlArgs)
    """trl GRPOConfig settings."""
    lora: LoraArgs = dataclasses.field(default_factory=LoraArgs)
    """LoRA adapters (r=0: off)."""
    rlsync: RLSyncConfig = dataclasses.field(default_factory=RLSyncConfig)
    """Engine layout, reload backend and sync verification."""

    def validate(self) -> None:
        check_bounds("trl", self.trl, TRL_BOUNDS)
        if self.trl.per_device_train_batch_size % self.trl.num_generations:
            raise ConfigError(
                f"trl.per_device_train_batch_size ({self.trl.per_device_train_batch_size}) must be a multiple "
                f"of trl.num_generations ({self.trl.num_generations})"
            )
        if self.lora.r < 0:
            raise ConfigError(f"lora.r must be >= 0, got {self.lora.r}")


# The interval each number makes sense in (`rlsync.config.bounds`); trl checks the rest of its own arguments.
TRL_BOUNDS = {
    "temperature": "(0, 10]", "learning_rate": "(0, 1]", "beta": "[0, 10]",
    "vllm_importance_sampling_clip_max": "(0, inf)",
}


@dataclasses.dataclass(kw_only=True, slots=True)
class TrlRun:
    """What `main` returns: the run directory and the trained objects."""

    path: Path
    """Run directory (`config.yaml`, `metrics.jsonl`)."""
    trainer: Any
    """The trl `GRPOTrainer` after training."""
    callback: RLSyncCallback
    """The callback (its `engine` and `reports`)."""


def main(cfg: TrlGRPOConfig) -> TrlRun:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    callback = RLSyncCallback(cfg.rlsync)  # first: fails fast on an unsupported trl
    require_model_path(cfg.model)  # before the run directory is written
    _refuse_old_checkpoints(cfg.run)
    torch.manual_seed(cfg.run.seed)
    with RunDir(cfg.run, cfg) as run:  # closed also when training raises
        policy, _, tokenizer = load_trainer_model(cfg.model)
        task = make_task(cfg.task, seed=cfg.run.seed, tokenizer=tokenizer)
        trainer = GRPOTrainer(
            model=policy,
            reward_funcs=list(task.reward_funcs),  # trl passes them the dataset's other columns (`answer`)
            args=GRPOConfig(**_grpo_args(cfg, run.path)),
            train_dataset=Dataset.from_list(task.records(cfg.trl.num_prompts)),
            processing_class=tokenizer,
            peft_config=_peft_config(cfg.lora),
            callbacks=[callback, _MetricsFile(run)],
        )
        trainer.train()
        with command_console():  # rlsync's lines on the terminal
            export_at_end(run)  # run.export: the final checkpoint as a Hugging Face checkpoint, LoRA merged
    return TrlRun(path=run.path, trainer=trainer, callback=callback)


def _grpo_args(cfg: TrlGRPOConfig, run_path: Path) -> dict[str, Any]:
    args = {f.name: getattr(cfg.trl, f.name) for f in dataclasses.fields(cfg.trl)}
    del args["num_prompts"], args["extra_args"]
    on_cpu = not torch.cuda.is_available()
    return {
        **args,
        "output_dir": str(run_path / TRL_DIR),
        "use_vllm": True,
        "vllm_mode": "colocate",
        "seed": cfg.run.seed,
        "use_cpu": on_cpu,
        "bf16": not on_cpu,  # trl's default mixed precision needs a GPU
        "report_to": [],
        **_save_args(cfg.run),
        **cfg.trl.extra_args,
    }


def _save_args(run: RunConfig) -> dict[str, Any]:
    """transformers' checkpoints from the run's keys: every `checkpoint_every` steps and after the last one
    (transformers saves the final step under the "steps" strategy), the newest `keep_checkpoints` kept."""
    if run.checkpoint_every == 0:
        return {"save_strategy": "no"}
    return {"save_strategy": "steps", "save_steps": run.checkpoint_every,
            "save_total_limit": run.keep_checkpoints or None}


def _refuse_old_checkpoints(run: RunConfig) -> None:
    """A fresh run must not mix its checkpoints with an earlier run's (an export would take the newest)."""
    old = trl_checkpoints(Path(run.output_dir) / run.name)
    if old and not run.overwrite:
        raise ConfigError(f"run.name: {old[-1].parent} already holds trl checkpoints "
                          f"({', '.join(p.name for p in old)}); export them (rlsync export "
                          f"{old[-1].parent.parent} OUT), choose another run.name, or set run.overwrite=true to "
                          f"start over")


def _peft_config(lora: LoraArgs):
    if lora.r == 0:
        return None
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules), task_type="CAUSAL_LM")


class _MetricsFile(TrainerCallback):
    """Append each trl log record to the run's metrics.jsonl (a killed run keeps every logged step)."""

    def __init__(self, run: RunDir) -> None:
        self.run = run

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.run.log(state.global_step, {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))})
