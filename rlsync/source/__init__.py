"""Trainer side: `WeightSource` implementations and `source_for(model)`."""

from rlsync.source.base import GatherStats, Group, TensorMeta, WeightSource
from rlsync.source.names import group_key, hf_name
from rlsync.source.plain import ModuleSource


def source_for(model, **kwargs) -> WeightSource:
    """The `WeightSource` that fits how `model` is wrapped (plain module or DDP here)."""
    if isinstance(model, WeightSource):
        return model
    return ModuleSource(model, **kwargs)


__all__ = ["GatherStats", "Group", "ModuleSource", "TensorMeta", "WeightSource", "group_key", "hf_name", "source_for"]
