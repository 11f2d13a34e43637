"""What a run must save to continue exactly: modules, optimizers, RNGs, task, step.

Why each piece: the policy and value weights and the optimizer moments are the
obvious ones; the torch / Python RNG states and the task's prompt RNG make the
next step draw the same randomness an uninterrupted run would; the rollout
engine needs no state of its own because the recipes seed every `generate`
call with `step_seed(run seed, step)` and re-sync the restored policy into a
freshly built engine before the first rollout.

Limitations:
1. Modules and optimizers are saved as full (unsharded) state dicts. Plain
   modules and DDP save as they are; with torch.distributed initialised the
   state goes through `torch.distributed.checkpoint.state_dict` (full state
   dict, CPU offload), which covers FSDP1 and FSDP2; on resume every rank reads
   the same file (one node or a shared filesystem). DeepSpeed engines keep their optimizer inside the engine:
   saving or loading them is refused (`CheckpointUnsupported`; the recipes refuse such configs when they load,
   see `rlsync.trainer.check_trainer_run`).
2. Each rank saves its own RNG and task state in the same file under
   `ranks[r]`, gathered to rank 0, so resuming with a different world size is
   refused.
3. The state holds tensors and plain Python data only (dicts, lists, tuples,
   numbers, strings, None): checkpoints are loaded with
   `torch.load(weights_only=True)` (`rlsync.rl.checkpoint`), which refuses
   anything else. A task's `state_dict` must keep to that too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rlsync.errors import ConfigError


class CheckpointUnsupported(ConfigError):
    """The trainer backend keeps state this checkpoint format cannot save."""


def step_seed(seed: int, step: int, salt: str = "rollout") -> int:
    """A 31-bit seed for `step` of a run seeded with `seed`, independent of any RNG state."""
    digest = hashlib.sha256(f"{salt}:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_distributed() -> bool:
    """More than one trainer rank (vLLM alone initialises a world of one in a single process)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def trainer_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _is_deepspeed(module: nn.Module) -> bool:
    return type(module).__name__ == "DeepSpeedEngine"


@dataclasses.dataclass(kw_only=True, slots=True)
class TrainState:
    """Everything a recipe restores on resume; `task` is any object with state_dict / load_state_dict."""

    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    task: Any

    def _refuse_deepspeed(self) -> None:
        for name, module in self.modules.items():
            if _is_deepspeed(module):
                raise CheckpointUnsupported(
                    f"run.checkpoint_every: the {name!r} module is a DeepSpeed engine, whose ZeRO optimizer state "
                    f"this checkpoint cannot save; set run.checkpoint_every=0 (or use DeepSpeed's save_checkpoint)"
                )

    def state_dict(self, step: int) -> dict[str, Any]:
        """The full state (collective when distributed: call on every rank; rank 0's result is the one to save)."""
        self._refuse_deepspeed()
        local = {"rng": rng_state(), "task": self.task.state_dict()}
        if is_distributed():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            modules, optimizers = {}, {}
            for name, module in self.modules.items():
                optim = self.optimizers.get(name)
                msd, osd = get_state_dict(module, optim if optim is not None else [], options=options)
                modules[name] = msd
                if optim is not None:
                    optimizers[name] = osd
            ranks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, local)
        else:
            modules = {name: _cpu(m.state_dict()) for name, m in self.modules.items()}
            optimizers = {name: _cpu(o.state_dict()) for name, o in self.optimizers.items()}
            ranks = [local]
        return {"step": step, "modules": modules, "optimizers": optimizers, "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> int:
        """Restore every piece; returns the step the state was saved at."""
        self._refuse_deepspeed()
        world = dist.get_world_size() if is_distributed() else 1
        if len(state["ranks"]) != world:
            raise ConfigError(f"resume: checkpoint was written by {len(state['ranks'])} ranks, this run has {world}")
        missing = (set(self.modules) - set(state["modules"])) | (set(self.optimizers) - set(state["optimizers"]))
        if missing:
            raise ConfigError(f"resume: checkpoint has no state for {sorted(missing)} (saved by another recipe?)")
        if is_distributed():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            options = StateDictOptions(full_state_dict=True)  # every rank read the same file
            for name, module in self.modules.items():
                optim = self.optimizers.get(name)
                set_state_dict(module, optim if optim is not None else [], model_state_dict=state["modules"][name],
                               optim_state_dict=state["optimizers"].get(name, {}), options=options)
        else:
            for name, module in self.modules.items():
                module.load_state_dict(state["modules"][name])
            for name, optim in self.optimizers.items():
                optim.load_state_dict(state["optimizers"][name])
        mine = state["ranks"][dist.get_rank() if is_distributed() else 0]
        self.task.load_state_dict(mine["task"])
        set_rng_state(mine["rng"])
        return int(state["step"])


def _cpu(data: Any) -> Any:
    if isinstance(data, torch.Tensor):
        return data.detach().to("cpu", copy=True)
    if isinstance(data, dict):
        return {k: _cpu(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_cpu(v) for v in data]
    if isinstance(data, tuple):
        return tuple(_cpu(v) for v in data)
    return data
