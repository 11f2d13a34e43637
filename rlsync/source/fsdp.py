"""Sources for PyTorch FSDP: FSDP2 (`fully_shard`, DTensor) and FSDP1 (`FullyShardedDataParallel`).

FSDP2: every sharded parameter is a `DTensor`; a bucket's parameters are
gathered with `full_tensor()` and dropped when the consumer moves on, so at
most one bucket is gathered, whatever units the user passed to `fully_shard`.

FSDP1: a wrapped unit's parameters live in one flat parameter that can only be
gathered as a whole, with `summon_full_params(unit, recurse=False,
writeback=False)`. A group summons the units that own its parameters (usually
one decoder layer's unit; the root unit for embeddings and the final norm) and
yields its buckets from inside that summon.

Limitations:
1. FSDP2: one all-gather per parameter (`full_tensor()`), not one per group;
   the user's `fully_shard` units need not line up with layer groups, and
   per-parameter gathers keep the bound exact.
2. FSDP1: the memory bound is the units a group touches (the root unit holds
   embeddings and final norm together), and `bucket_bytes` cannot split a unit:
   it bounds yielded buckets, not the summon.
3. Activation-checkpointing and `torch.compile` wrappers are handled through
   names only (`names.hf_name`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.tensor import DTensor

from rlsync.source.gather import Entry, GatheringSource


def is_fsdp2(model: nn.Module) -> bool:
    """True when any parameter is a DTensor (FSDP2 / `fully_shard`, or another DTensor sharding)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def is_fsdp1(model: nn.Module) -> bool:
    """True when `model` is or contains a `FullyShardedDataParallel` unit."""
    return any(isinstance(m, FSDP) for m in model.modules())


class FSDP2Source(GatheringSource):
    """Weights of a model sharded with `fully_shard` (DTensor parameters)."""

    collective = True

    def _entries(self) -> list[Entry]:
        return [
            Entry(raw=name, shape=tuple(p.shape), dtype=p.dtype, param=p)
            for name, p in self.model.named_parameters()
        ]

    def _gathered_nbytes(self, entries: list[Entry]) -> int:
        return sum(e.nbytes for e in entries if isinstance(e.param, DTensor))

    @contextlib.contextmanager
    def _gather(self, entries: list[Entry]) -> Iterator[list[torch.Tensor]]:
        with torch.no_grad():
            full = [e.param.full_tensor() if isinstance(e.param, DTensor) else e.param for e in entries]
        yield full


class FSDP1Source(GatheringSource):
    """Weights of a model wrapped with `FullyShardedDataParallel` (one or many units)."""

    collective = True

    def _entries(self) -> list[Entry]:
        module_order = {path: i for i, (path, _) in enumerate(self.model.named_modules())}
        unit_paths = {id(m): path for path, m in self.model.named_modules() if isinstance(m, FSDP)}
        keyed = []
        for unit in FSDP.fsdp_modules(self.model):
            handle = unit._handle
            if handle is None:  # a unit without parameters of its own
                continue
            flat = handle.flat_param
            prefix = unit_paths[id(unit)]
            prefix = f"{prefix}._fsdp_wrapped_module." if prefix else "_fsdp_wrapped_module."
            for position, (fqn, shape) in enumerate(zip(flat._fqns, flat._shapes, strict=True)):
                raw = prefix + fqn
                order = module_order.get(raw.rsplit(".", 1)[0], len(module_order))
                entry = Entry(raw=raw, shape=tuple(shape), dtype=flat.dtype, owner=(unit, fqn))
                keyed.append(((order, position), entry))
        keyed.sort(key=lambda pair: pair[0])
        return [entry for _, entry in keyed]

    @contextlib.contextmanager
    def _scope(self, entries: list[Entry]) -> Iterator[int]:
        units: dict[int, FSDP] = {}
        for entry in entries:
            units.setdefault(id(entry.owner[0]), entry.owner[0])
        nbytes = 0
        with contextlib.ExitStack() as stack:
            for unit in units.values():
                handle = unit._handle
                if handle.uses_sharded_strategy:
                    nbytes += handle.flat_param._unpadded_unsharded_size.numel() * handle.flat_param.dtype.itemsize
                stack.enter_context(FSDP.summon_full_params(unit, recurse=False, writeback=False))
            yield nbytes

    @contextlib.contextmanager
    def _gather(self, entries: list[Entry]) -> Iterator[list[torch.Tensor]]:
        # inside the group's summon: the original parameters are full views of the flat parameter
        yield [functools.reduce(getattr, fqn.split("."), unit.module) for unit, fqn in (e.owner for e in entries)]
