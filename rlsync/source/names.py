"""Hugging Face checkpoint names from wrapped module names, in one place.

Trainer wrappers rename parameters: DDP adds `module.`, FSDP1 adds
`_fsdp_wrapped_module.`, activation checkpointing `_checkpoint_wrapped_module.`,
`torch.compile` `_orig_mod.`, PEFT `base_model.model.` and `.base_layer`. The
engine wants the names the checkpoint on disk uses, so every source routes its
names through `hf_name`. Grouping (`group_key`) is by the outermost layer index,
so every architecture groups alike.
"""

from __future__ import annotations

import re

_DROP_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod", "base_layer")
_LEADING = ("module.", "base_model.model.")
_INDEX = re.compile(r"^\d+$")


def hf_name(name: str) -> str:
    """Strip trainer/wrapper segments so `name` matches the HF checkpoint."""
    changed = True
    while changed:
        changed = False
        for prefix in _LEADING:
            if name.startswith(prefix):
                name = name[len(prefix):]
                changed = True
    return ".".join(part for part in name.split(".") if part not in _DROP_SEGMENTS)


def group_key(name: str) -> str | None:
    """The layer group a (HF-named) parameter belongs to, e.g. `model.layers.3`.

    `None` for parameters outside any indexed layer (embeddings, final norm,
    head); consecutive such parameters form one group.
    """
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if _INDEX.match(part):
            return ".".join(parts[: i + 1])
    return None
