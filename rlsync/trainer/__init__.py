"""The trainer side of a recipe: one `trainer:` config switch from one process to DDP, FSDP1/2 or ZeRO-2/3.

    setup_distributed(cfg.trainer)            # first: before any vLLM engine is built
    trainer = wrap(policy, cfg.trainer, make_optimizer, max_grad_norm=...)
    loss = ...(trainer.model)
    trainer.stepper.zero_grad(); trainer.stepper.backward(loss); grad_norm = trainer.stepper.step()
    engine.sync(source_for(trainer.model), step)

Owns: `TrainerConfig`, process-group setup, wrapping, the steppers.
May import: `rlsync.errors` only. Importing this package imports torch only;
DeepSpeed and PEFT are imported when a config asks for them.
"""

from rlsync.trainer.config import DEEPSPEED_BACKENDS, LoraOptions, TrainerConfig, check_trainer_run
from rlsync.trainer.dist import (average_grads, init_deepspeed, mean_over_ranks, setup_distributed, teardown_distributed,
                                 world_size)
from rlsync.trainer.stepper import DeepSpeedStepper, Stepper, TorchStepper
from rlsync.trainer.wrap import Trainer, apply_lora, deepspeed_config, wrap

__all__ = [
    "DEEPSPEED_BACKENDS", "DeepSpeedStepper", "LoraOptions", "Stepper", "TorchStepper", "Trainer", "TrainerConfig",
    "apply_lora", "average_grads", "check_trainer_run", "deepspeed_config", "init_deepspeed", "mean_over_ranks",
    "setup_distributed",
    "teardown_distributed", "world_size", "wrap",
]
