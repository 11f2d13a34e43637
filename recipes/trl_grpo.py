"""trl's `GRPOTrainer` with FP8 colocated rollouts through `RLSyncCallback`.

    rlsync run configs/trl/grpo_tiny_cpu_fp8.yaml [key=value ...]

The same tasks as `recipes/grpo.py` (`task.name`: the vowels reward on the
built-in tiny model by default, `gsm8k`, or one your script registered; the
task's reward functions are trl's `reward_funcs`), trained by trl instead of
rlsync's own loop: trl samples from the
rlsync engine (FP8), corrects the rollout/trainer mismatch with its importance
sampling, and the callback syncs every step in layer groups. trl's log
history (with the `sync/...` metrics) is appended to `<run dir>/metrics.jsonl`
and goes to the trackers in `run.report_to` through trl's own reporters.

The terminal is rlsync's, as in the other recipes (`rlsync.rl.console`): a step
bar with the reward and the sync time instead of transformers' bar and its
printed log dicts, vLLM's log in `<run dir>/run.log` (`rlsync run -v` shows it),
a summary at the end. trl is imported inside that console: what its import
writes to stderr (trl warns that it was not tested with this vLLM, whose engine
rlsync replaces; vLLM's own import notices) goes to run.log too, and trl's
`VLLM_LOGGING_LEVEL=ERROR` default is not left in the environment. On a
machine without CUDA, DeepSpeed is told the CPU accelerator its detection
would pick, so it does not warn that it picked it.

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

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm
from transformers import TrainerCallback

from rlsync.adapters.vllm_logs import native_output_to_log
from rlsync.config import to_dict
from rlsync.config.bounds import check_bounds
from rlsync.errors import ConfigError
from rlsync.integrations.trl import RLSyncCallback, RLSyncConfig
from rlsync.rl.console import run_console
from rlsync.rl.export import TRL_DIR, export_at_end, trl_checkpoints
from rlsync.rl.run import RunConfig, RunDir
from rlsync.rl.tracking import TrackerRun, trl_reporting
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
    require_model_path(cfg.model)  # before the run directory is written
    _refuse_old_checkpoints(cfg.run)
    torch.manual_seed(cfg.run.seed)
    # closed also when training raises; vLLM's log to <run dir>/run.log, a summary at the end
    with RunDir(cfg.run, cfg) as run, run_console(run, cfg.run):
        trainer, callback = train(cfg, run)
        export_at_end(run)  # run.export: the final checkpoint as a Hugging Face checkpoint, LoRA merged
    return TrlRun(path=run.path, trainer=trainer, callback=callback)


def train(cfg: TrlGRPOConfig, run: RunDir) -> tuple[Any, RLSyncCallback]:
    """Build trl's trainer around rlsync's engine and train it, logging into `run`."""
    from datasets import Dataset

    GRPOConfig, GRPOTrainer = _import_trl()
    callback = RLSyncCallback(cfg.rlsync)  # fails on an unsupported trl, before a model is loaded
    policy, _, tokenizer = load_trainer_model(cfg.model)
    task = make_task(cfg.task, seed=cfg.run.seed, tokenizer=tokenizer)
    callback.metric_names.update(success_metric(task))
    who = TrackerRun(path=run.path, project=cfg.run.project, name=cfg.run.name, config=to_dict(cfg))
    with _deepspeed_accelerator_named(), trl_reporting(cfg.run.report_to, who) as reporting:
        trainer = GRPOTrainer(
            model=policy,
            reward_funcs=list(task.reward_funcs),  # trl passes them the dataset's other columns (`answer`)
            args=GRPOConfig(**_grpo_args(cfg, run.path, reporting.args)),
            train_dataset=Dataset.from_list(task.records(cfg.trl.num_prompts)),
            processing_class=tokenizer,
            peft_config=_peft_config(cfg.lora),
            callbacks=[callback, _MetricsFile(run), _StepBar(enabled=cfg.run.progress), *reporting.callbacks],
        )
        _StepBar.replace_transformers_output(trainer)
        trainer.train()
    return trainer, callback


def _import_trl():
    """trl's `GRPOConfig` and `GRPOTrainer`, imported with the run's stderr routing (see the module docstring)."""
    level = os.environ.get("VLLM_LOGGING_LEVEL")
    with native_output_to_log():  # to run.log unless run.verbose
        from trl import GRPOConfig, GRPOTrainer
    if level is None:  # trl._compat set it (to ERROR) for its own vLLM engine, which rlsync replaces
        os.environ.pop("VLLM_LOGGING_LEVEL", None)
    return GRPOConfig, GRPOTrainer


def success_metric(task) -> dict[str, str]:
    """`success` (rlsync's name for the fraction right) -> trl's name for the same mean, for a task whose success
    check is one of its rewards (trl logs each reward function's mean as `rewards/<name>/mean`); else nothing."""
    success = task.spec.success
    return {"success": f"rewards/{success.__name__}/mean"} if success in task.reward_funcs else {}


@contextlib.contextmanager
def _deepspeed_accelerator_named() -> Iterator[None]:
    """Without CUDA, `DS_ACCELERATOR=cpu` while transformers' trainer runs: where DeepSpeed is installed the
    trainer imports it, and DeepSpeed's accelerator detection, falling back to the CPU, says so with a WARNING on
    stdout; named, it takes the same accelerator silently. An explicit DS_ACCELERATOR is kept."""
    if torch.cuda.is_available() or "DS_ACCELERATOR" in os.environ:
        yield
        return
    os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        yield
    finally:
        os.environ.pop("DS_ACCELERATOR", None)


def _grpo_args(cfg: TrlGRPOConfig, run_path: Path, reporting: dict[str, Any]) -> dict[str, Any]:
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
        **reporting,  # report_to, run_name, project (rlsync.rl.tracking.trl_reporting)
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


class _StepBar(TrainerCallback):
    """rlsync's step bar (reward and sync seconds after each logged step), in place of transformers' bar, which
    also prints every log record as a dict."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: tqdm | None = None

    @staticmethod
    def replace_transformers_output(trainer) -> None:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="trl_grpo", unit="step",
                            disable=not self.enabled)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if self.bar is not None and "reward" in logs:
            postfix = {"reward": f"{logs['reward']:.3f}"}
            if "sync/seconds" in logs:
                postfix["sync_s"] = f"{logs['sync/seconds']:.3f}"
            self.bar.set_postfix(postfix)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
