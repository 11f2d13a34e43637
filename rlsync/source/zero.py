"""Source for DeepSpeed ZeRO-3: `GatheredParameters` over one bucket at a time.

Under ZeRO-3 each parameter holds only this rank's partition (`p.shape` is
empty; `p.ds_shape` is the full shape). A bucket's parameters are gathered
together with `deepspeed.zero.GatheredParameters(params, modifier_rank=None)`
(one collective call, nothing broadcast back, partitions restored on exit),
and the bucket is yielded from inside that context, so the full copies are
freed as soon as the consumer asks for the next bucket.

ZeRO-1 and ZeRO-2 partition only optimizer state and gradients; their modules
hold full parameters, so `source_for` gives them a `ModuleSource`.

Limitations:
1. DeepSpeed is imported lazily, only when the model is a DeepSpeed engine or
   holds ZeRO-3 parameters.
2. Parameters gathered by an enclosing `GatheredParameters` context cannot be
   gathered again (DeepSpeed forbids overlapping contexts).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from torch import nn

from rlsync.source.gather import Entry, GatheringSource


def is_deepspeed_engine(model: nn.Module) -> bool:
    if "deepspeed" not in sys.modules:
        return False
    from deepspeed import DeepSpeedEngine

    return isinstance(model, DeepSpeedEngine)


def has_zero3_params(model: nn.Module) -> bool:
    """True when parameters are ZeRO-3 partitioned (a DeepSpeed engine or `zero.Init` outside one)."""
    if "deepspeed" not in sys.modules:
        return False
    from deepspeed.runtime.zero.utils import is_zero_param

    return any(is_zero_param(p) for p in model.parameters())


class Zero3Source(GatheringSource):
    """Weights of a model whose parameters are ZeRO-3 partitioned."""

    collective = True

    def _entries(self) -> list[Entry]:
        from deepspeed.runtime.zero.utils import is_zero_param

        entries = []
        for name, p in self.model.named_parameters():
            shape = tuple(p.ds_shape) if is_zero_param(p) else tuple(p.shape)
            entries.append(Entry(raw=name, shape=shape, dtype=p.dtype, param=p))
        return entries

    def _gathered_nbytes(self, entries: list[Entry]) -> int:
        from deepspeed.runtime.zero.utils import is_zero_param

        return sum(e.nbytes for e in entries if is_zero_param(e.param))

    @contextlib.contextmanager
    def _gather(self, entries: list[Entry]) -> Iterator[list[torch.Tensor]]:
        import deepspeed

        params = [e.param for e in entries]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield [p.data for p in params]
