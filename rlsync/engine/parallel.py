"""Tensor-parallel engines: what a launch must look like, and one verdict per TP group after each sync.

Why: with `engine.tensor_parallel_size` k > 1, k consecutive ranks of the
trainer's world form one vLLM engine (`external_launcher`), each rank holding
its shard. Two things then need the whole group:
- **the launch.** vLLM fails deep inside its build (or hangs) when the world
  does not split into groups of k, when no launcher started the ranks, or when
  the model's heads or MLP do not divide by k. `check_launch` refuses those
  before anything is built, naming the key and the numbers.
- **fail closed.** A sync that fails on one rank and succeeds on another would
  leave a group whose shards come from different steps, and vLLM would happily
  sample from it. After every sync each rank states its outcome to the group
  (`group_failures`, one small all-gather on the group's CPU channel); if any
  rank failed, every rank of the group ends FAILED, and the error names the
  failing ranks and their errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from rlsync.errors import ConfigError

_DIVISIBLE = (
    ("num_attention_heads", "attention heads"),
    ("intermediate_size", "MLP intermediate size"),
    ("moe_intermediate_size", "expert intermediate size"),
)


def model_parallel_sizes(model_dir: str | Path) -> dict[str, int]:
    """The sizes tensor parallelism splits, from the checkpoint's config.json (plain JSON, no code)."""
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"engine.model: cannot read {path}: {exc}") from exc
    raw = raw.get("text_config", raw) if isinstance(raw.get("text_config"), dict) else raw
    keys = [k for k, _ in _DIVISIBLE] + ["num_key_value_heads"]
    return {k: int(raw[k]) for k in keys if isinstance(raw.get(k), int)}


def check_launch(k: int, model_dir: str | Path) -> None:
    """`ConfigError` unless `k` ranks per engine fit this process's launch and the model; before any build."""
    if k == 1:
        return
    launched = dist.is_available() and dist.is_initialized()
    problem = launch_problem(k, dist.get_world_size() if launched else None, model_parallel_sizes(model_dir))
    if problem:
        raise ConfigError(f"engine.tensor_parallel_size={k}: {problem}")


def launch_problem(k: int, world: int | None, sizes: dict[str, int]) -> str | None:
    """Why `k` ranks per engine cannot work with `world` ranks (None: no torch.distributed) and a model of
    these `sizes` (`model_parallel_sizes`); None when they can."""
    if k == 1:
        return None
    if world is None or world < k:
        found = "no torch.distributed" if world is None else f"a world of {world} rank(s)"
        return (f"a tensor-parallel engine spans {k} processes, and this process has {found}. Start them with a "
                f"launcher (e.g. `torchrun --nproc_per_node {k} ...`, or deepspeed) and initialize torch.distributed "
                "before building the engine (the recipes do)")
    if world % k:
        return f"the world of {world} ranks does not split into groups of {k} (world = data-parallel groups x {k})"
    for name, what in _DIVISIBLE:
        if name in sizes and sizes[name] % k:
            return f"the model's {what} ({name}={sizes[name]}) do not divide by {k}"
    kv = sizes.get("num_key_value_heads")
    if kv is not None and kv % k and k % kv:
        return f"the model's {kv} key/value heads neither divide by {k} nor divide {k} (vLLM splits or replicates them)"
    return None


def group_gather(group, obj) -> list:
    """`obj` from every rank of `group` (a gloo group), in TP-rank order; `[obj]` without a group."""
    if group is None:
        return [obj]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def group_failures(group, error: BaseException | None) -> list[str]:
    """Every TP-group rank's sync outcome, gathered on `group` (a gloo group); the failures, as
    "rank R (TP rank r): Error: message", in rank order. Called by every rank of the group after each sync."""
    mine = None if error is None else f"{type(error).__name__}: {error}"
    outcomes = group_gather(group, (dist.get_rank(), mine))
    return [f"rank {rank} (TP rank {i}): {msg}" for i, (rank, msg) in enumerate(outcomes) if msg is not None]
