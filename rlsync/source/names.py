"""Hugging Face checkpoint names from wrapped module names, in one place.

Trainer wrappers rename parameters: DDP and DeepSpeed add `module.`, FSDP1
`_fsdp_wrapped_module.`, activation checkpointing `_checkpoint_wrapped_module.`,
`torch.compile` `_orig_mod.`, PEFT `base_model.model.`, `.base_layer` and
`.modules_to_save.<adapter>.`. The engine wants the names the checkpoint on disk
uses, so every source routes its names through `hf_name`, and asks
`is_trainer_only` which parameters the checkpoint never has (LoRA factors, the
frozen original behind a `modules_to_save` copy). Grouping (`group_key`) is by
the outermost layer index, so every architecture groups alike.
"""

from __future__ import annotations

import re

_DROP_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod", "base_layer"})
_LEADING = ("module.", "base_model.model.")
# PEFT's trainable copy: `lm_head.modules_to_save.<adapter>.weight` is `lm_head.weight`.
_MODULES_TO_SAVE = "modules_to_save"
# Segments whose parameters exist only in the trainer (LoRA factors, DoRA
# magnitudes, the frozen module a `modules_to_save` copy replaces).
_TRAINER_ONLY = frozenset({
    "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "original_module",
})
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
    parts = [part for part in name.split(".") if part not in _DROP_SEGMENTS]
    out: list[str] = []
    skip_next = False
    for part in parts:
        if skip_next:  # the adapter name after `modules_to_save`
            skip_next = False
            continue
        if part == _MODULES_TO_SAVE:
            skip_next = True
            continue
        out.append(part)
    return ".".join(out)


def is_trainer_only(name: str) -> bool:
    """True for parameters a Hugging Face checkpoint never holds (LoRA factors, PEFT's frozen originals)."""
    return any(part in _TRAINER_ONLY for part in name.split("."))


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
