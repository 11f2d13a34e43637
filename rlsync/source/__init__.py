"""Trainer side: `WeightSource` implementations and `source_for(model)`.

Owns: `WeightSource`, `SourceConfig` (every source is built from one),
`source_for`, name mapping to checkpoint names, the lockstep protocol.
May import: `rlsync.errors` only (no engine, reload or quant: it yields groups of plain
`(name, tensor)` pairs, MoE experts also named as stacks: `stacked.py`). Importing this package imports torch only;
DeepSpeed and PEFT are looked at only when a model uses them.
"""

from rlsync.source.base import GatherStats, Group, SourceConfig, TensorMeta, WeightSource
from rlsync.source.fsdp import FSDP1Source, FSDP2Source
from rlsync.source.gather import GatheringSource
from rlsync.source.lockstep import LockstepError
from rlsync.source.names import group_key, hf_name, is_trainer_only
from rlsync.source.plain import ModuleSource
from rlsync.source.select import source_for
from rlsync.source.stacked import Stack, StackedGroup, segments, stacks_of
from rlsync.source.zero import Zero3Source

__all__ = [
    "FSDP1Source", "FSDP2Source", "GatherStats", "GatheringSource", "Group", "LockstepError", "ModuleSource",
    "SourceConfig", "Stack", "StackedGroup", "TensorMeta", "WeightSource", "Zero3Source", "group_key", "hf_name", "is_trainer_only",
    "segments", "source_for", "stacks_of",
]
