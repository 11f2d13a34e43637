"""The trainer's process group: joined once per launched rank, before any vLLM engine is built.

Why first: each rank builds its own colocated vLLM engine, and vLLM sets up a
world of one inside the process; the trainer's group (gloo on CPU, NCCL with
CUDA) must already exist when it does, or building the engine first leaves
torch.distributed in a state the trainer cannot join (seen on CPU).

The launchers (torchrun, the deepspeed launcher) only set `RANK`,
`WORLD_SIZE`, `LOCAL_RANK` and `MASTER_*`; `setup_distributed` joins the
group the backend needs (DeepSpeed's own `init_distributed` for zero2/zero3,
through `init_deepspeed`, which also removes the names of DeepSpeed's CPU
shared-memory buffers: see its docstring).

Limitations:
1. One node: the CUDA device is `LOCAL_RANK`, and nothing here spans nodes
   beyond what the launcher's environment already does.
2. `mean_over_ranks` averages every metric, counts included (a per-rank
   figure such as sync seconds becomes the ranks' mean, not their maximum).
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from torch import nn

from rlsync.errors import ConfigError
from rlsync.trainer.config import TrainerConfig

_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def world_size() -> int:
    """Trainer ranks (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def setup_distributed(cfg: TrainerConfig) -> int:
    """Join the launcher's process group for `cfg.backend`; returns the world size (1 for `single`)."""
    launched_world = int(os.environ.get("WORLD_SIZE", "1"))
    if not cfg.is_distributed:
        if launched_world > 1:
            raise ConfigError(f"trainer.backend: single, but this process was launched as one of {launched_world} "
                              f"ranks (WORLD_SIZE); pick ddp, fsdp1, fsdp2, zero2 or zero3, or run without a launcher")
        return 1
    missing = [k for k in _LAUNCH_ENV if k not in os.environ]
    if missing:
        launcher = "deepspeed --num_gpus N" if cfg.is_deepspeed else "torchrun --nproc_per_node N"
        raise ConfigError(f"trainer.backend: {cfg.backend} needs a launcher ({launcher} ... rlsync run CONFIG); "
                          f"{', '.join(missing)} not set")
    if dist.is_initialized():
        return dist.get_world_size()
    backend = cfg.dist_backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if cfg.is_deepspeed:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        init_deepspeed(backend)
    else:
        dist.init_process_group(backend)
    return dist.get_world_size()


DEEPSPEED_SHM_PREFIX = "deepspeed_allreduce_buffer"
"""The names DeepSpeed's CPU all-reduce gives its shared-memory buffers: `{prefix}_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}`."""


def deepspeed_shm_name(rank: int) -> str:
    """This launch's DeepSpeed CPU all-reduce buffer of `rank`, as `shm_open` names it (DeepSpeed's shm.cpp)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"{DEEPSPEED_SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def init_deepspeed(backend: str) -> None:
    """`deepspeed.init_distributed`, then this rank's DeepSpeed shared-memory buffer name removed.

    Why: on CPU, when every rank is on one machine (the deepspeed launcher's
    `LOCAL_SIZE`), DeepSpeed's all-reduce maps a 66 MiB POSIX shared-memory
    buffer per rank and never unlinks it. Each launch left 132 MiB of
    /dev/shm, which is RAM, until reboot: a test machine had 13 GB of them.
    `init_distributed` returns on a rank only after it has mapped every
    peer's buffer, so after a barrier no rank opens a name again; the
    mappings stay valid, and the kernel frees the memory when the last rank
    exits, on a crash too.
    """
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if dist.get_world_size() < 2 or torch.cuda.is_available():
        return
    dist.barrier()
    try:
        from _posixshmem import shm_unlink  # CPython's own binding (multiprocessing.shared_memory uses it)
    except ImportError:  # not a POSIX system
        return
    try:
        shm_unlink("/" + deepspeed_shm_name(dist.get_rank()))
    except FileNotFoundError:
        pass  # DeepSpeed took another all-reduce path (ranks on several machines, no shm op built)


def teardown_distributed() -> None:
    """Wait for every rank at the end of a run; the group itself is left to interpreter exit.

    Why not `destroy_process_group()`: the colocated vLLM engine destroys its
    own groups when it shuts down at exit, and fails ("Invalid process group
    specified") once the default group is gone.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the trainer ranks (one collective); `metrics` as is in one process."""
    world = world_size()
    if world == 1:
        return metrics
    gathered: list[dict[str, float] | None] = [None] * world
    dist.all_gather_object(gathered, metrics)
    keys = set(metrics)
    for rank, theirs in enumerate(gathered):
        assert theirs is not None
        if set(theirs) != keys:
            raise RuntimeError(f"ranks logged different metrics: rank {rank} has {sorted(set(theirs) ^ keys)} "
                               f"that rank {dist.get_rank()} does not share")
    return {k: math.fsum(float(g[k]) for g in gathered if g is not None) / world for k in metrics}


def average_grads(modules: list[nn.Module]) -> None:
    """Average the gradients of modules no parallel wrapper owns (a value head) over the ranks: one all-reduce."""
    world = world_size()
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if world == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
