"""`ModuleSource`: a model whose parameters are local and full on every rank.

Covers a single-process model, DDP (`.module`), DeepSpeed ZeRO-1/2 (the
engine's `.module` holds full parameters; only optimizer state and gradients
are partitioned) and any of them with PEFT/LoRA. Nothing is gathered and no
collective runs, so no lockstep is needed: groups are views of the trainer's
own parameters, and the only bytes counted are those derived from them (LoRA
merges, dtype casts). Tied parameters (an LM head sharing the embedding) are
yielded once, under the name registered first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from typing import Any

import torch
from torch import nn

from rlsync.source.base import SourceConfig
from rlsync.source.gather import Entry, GatheringSource


class ModuleSource(GatheringSource):
    """Weights of a module with local parameters (unwraps DDP's `.module`)."""

    own_storage = True

    def __init__(self, model: nn.Module, config: SourceConfig | None = None, /, **options: Any) -> None:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        super().__init__(model, config, **options)

    def _entries(self) -> list[Entry]:
        return [
            Entry(raw=name, shape=tuple(p.shape), dtype=p.dtype, param=p)
            for name, p in self.model.named_parameters()
        ]

    @contextlib.contextmanager
    def _gather(self, entries: list[Entry]) -> Iterator[list[torch.Tensor]]:
        yield [e.param for e in entries]
