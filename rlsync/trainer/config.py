"""How the trainer holds the policy: one config section a recipe exposes as `trainer:`.

One switch (`backend`) picks the parallelism; the recipe code is the same for
all of them (`rlsync.trainer.wrap`). The checks here run when the config
loads, before any launcher rank has imported vLLM, so a config that cannot work
fails at once, naming the key.

Limitations:
1. ZeRO-2/3 runs cannot checkpoint or resume: the optimizer state lives inside
   the DeepSpeed engine, which `rlsync.rl.state.TrainState` does not save.
   `check_trainer_run` refuses `run.checkpoint_every > 0` and `resume=true`
   for them.
2. LoRA is applied with PEFT before wrapping; only the adapter weights train,
   and the sources merge them into the base weights at every sync.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from rlsync.errors import ConfigError

Backend = Literal["single", "ddp", "fsdp1", "fsdp2", "zero2", "zero3"]
DEEPSPEED_BACKENDS = ("zero2", "zero3")
# Set by `wrap` from the backend and the recipe's settings; a `deepspeed:` section may not override them.
_DEEPSPEED_RESERVED = ("zero_optimization.stage", "gradient_clipping", "gradient_accumulation_steps",
                       "train_micro_batch_size_per_gpu", "train_batch_size", "optimizer")


@dataclasses.dataclass(kw_only=True, slots=True)
class LoraOptions:
    """PEFT LoRA adapters on the policy (r = 0: full fine-tuning)."""

    r: int = 0
    """Adapter rank; 0 disables LoRA."""
    alpha: float = 16.0
    """LoRA alpha (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = dataclasses.field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Module name suffixes that get adapters."""

    def validate(self) -> None:
        if self.r < 0:
            raise ConfigError(f"trainer.lora.r must be >= 0 (0 = no LoRA), got {self.r}")
        if self.r and not self.target_modules:
            raise ConfigError("trainer.lora.target_modules must name at least one module when trainer.lora.r > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"trainer.lora.dropout must be in [0, 1), got {self.dropout}")
        if self.alpha <= 0:
            raise ConfigError(f"trainer.lora.alpha must be > 0, got {self.alpha}")


@dataclasses.dataclass(kw_only=True, slots=True)
class TrainerConfig:
    """Parallelism of the trainer and how its weights are gathered for a sync."""

    backend: Backend = "single"
    """single (one process), ddp, fsdp1, fsdp2 (torchrun), zero2, zero3 (deepspeed launcher)."""
    lora: LoraOptions = dataclasses.field(default_factory=LoraOptions)
    """PEFT LoRA adapters (lora.r = 0: none)."""
    deepspeed: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Extra DeepSpeed config entries merged into the generated one (zero2 / zero3 only)."""
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend: auto = nccl with CUDA, else gloo."""
    timeout_s: float = 300.0
    """How long a rank waits for the others at a sync's lockstep check before failing."""
    bucket_bytes: int | None = None
    """Gather at most this many bytes at once during a sync (null: one layer group at a time)."""

    def validate(self) -> None:
        if self.timeout_s <= 0:
            raise ConfigError(f"trainer.timeout_s must be > 0, got {self.timeout_s}")
        if self.bucket_bytes is not None and self.bucket_bytes <= 0:
            raise ConfigError(f"trainer.bucket_bytes must be > 0 or null, got {self.bucket_bytes}")
        if self.deepspeed and self.backend not in DEEPSPEED_BACKENDS:
            raise ConfigError(f"trainer.deepspeed is only used by the zero2 / zero3 backends, "
                              f"not trainer.backend={self.backend}; remove it")
        for key in _DEEPSPEED_RESERVED:
            if _lookup(self.deepspeed, key):
                raise ConfigError(f"trainer.deepspeed.{key} is set by rlsync (from trainer.backend and the "
                                  f"recipe's settings); remove it")

    @property
    def is_deepspeed(self) -> bool:
        return self.backend in DEEPSPEED_BACKENDS

    @property
    def is_distributed(self) -> bool:
        return self.backend != "single"


def check_trainer_run(trainer: TrainerConfig, *, checkpoint_every: int, resume: bool) -> None:
    """Cross-section checks: DeepSpeed backends neither checkpoint nor resume (limitation 1)."""
    if trainer.is_deepspeed and checkpoint_every > 0:
        raise ConfigError(f"run.checkpoint_every: trainer.backend={trainer.backend} keeps its optimizer state inside "
                          f"the DeepSpeed engine, which rlsync checkpoints cannot save; set run.checkpoint_every=0")
    if trainer.is_deepspeed and resume:
        raise ConfigError(f"resume: trainer.backend={trainer.backend} runs cannot be resumed (no rlsync checkpoints "
                          f"under DeepSpeed); set resume=false")


def _lookup(data: dict[str, Any], dotted: str) -> bool:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True
