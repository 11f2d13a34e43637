"""`ModuleSource`: a single-process (or DDP) model whose parameters are local.

Nothing is gathered: groups are views of the trainer's own parameters (or casts
of them when `dtype` is set, which are the only bytes counted as gathered).
Tied parameters (an LM head sharing the embedding) are yielded once, under the
name registered first, as `named_parameters()` already deduplicates them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from rlsync.source.base import Group, TensorMeta, WeightSource
from rlsync.source.names import group_key, hf_name


def iter_named_groups(named: list[tuple[str, torch.Tensor]]) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Split `(hf_name, x)` pairs, in order, into consecutive runs of one group key."""
    current: list[tuple[str, torch.Tensor]] = []
    current_key: object = ()
    for name, value in named:
        key = group_key(name)
        if current and key != current_key:
            yield current
            current = []
        current_key = key
        current.append((name, value))
    if current:
        yield current


class ModuleSource(WeightSource):
    """Weights of a plain `nn.Module` (unwraps DDP's `.module`)."""

    def __init__(self, model: nn.Module, *, dtype: torch.dtype | None = None) -> None:
        super().__init__(dtype=dtype)
        self.model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def _named(self) -> list[tuple[str, torch.Tensor]]:
        return [(hf_name(n), p) for n, p in self.model.named_parameters()]

    def metadata(self) -> list[TensorMeta]:
        return [
            TensorMeta(name=n, shape=tuple(p.shape), dtype=self.dtype or p.dtype)
            for n, p in self._named()
        ]

    def groups(self) -> Iterator[Group]:
        self.stats.reset()
        for group in iter_named_groups(self._named()):
            out = [(n, self._cast(p)) for n, p in group]
            cast_bytes = sum(t.nbytes for (_, t), (_, p) in zip(out, group) if t is not p.data and t.data_ptr() != p.data_ptr())
            self.stats.add(cast_bytes)
            self.stats.num_groups += 1
            yield out
            del out
            self.stats.release(cast_bytes)
