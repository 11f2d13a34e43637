"""`reload_weights`: one call that reloads a captured model in place.

Two formats of incoming weights:
- checkpoint format (`process_weights_after_loading=True`, the default): names
  as the checkpoint spells them, run through a `Reload` session (load format,
  vLLM's loaders, processing, copy into kernel storage). `weights=None` reads
  the checkpoint the engine was built from, through vLLM's own model loader.
- kernel format (`process_weights_after_loading=False`): names and shapes of
  the engine's own parameters (`model.named_parameters()`), copied as they are.
  Every name, shape and dtype is checked before the first byte is written, so
  a mismatch changes nothing; that check needs the whole list, so the
  iterator is consumed first (references only, no copies).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from rlsync.adapters import vllm_load
from rlsync.reload.capture import get_capture
from rlsync.reload.session import Reload


def reload_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]] | None = None,
    *,
    process_weights_after_loading: bool = True,
) -> set[str]:
    """Reload `model`'s weights in place, keeping every kernel tensor's storage; return the names loaded.

    On failure in checkpoint format the session is aborted (every layer back on
    its kernel tensors, contents undefined) and the error re-raised.
    """
    if not process_weights_after_loading:
        if weights is None:
            raise ValueError(
                "process_weights_after_loading=False needs weights in kernel format; the checkpoint on disk "
                "(weights=None) is in load format, reload it with process_weights_after_loading=True"
            )
        return copy_kernel_format(model, weights)
    if weights is None:
        vllm_config = get_capture(model).vllm_config
        if vllm_config is None:
            raise ValueError("weights=None reloads the checkpoint vLLM built the model from, but this model was not built by vLLM")
        weights = vllm_load.checkpoint_weights(vllm_config, model)
    session = Reload(model)
    try:
        session.begin()  # rolls itself back if it fails part-way; aborting again is harmless
        session.load(weights)
        session.commit()
    except BaseException:
        session.abort()
        raise
    return session.loaded_names


def copy_kernel_format(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Copy tensors already in kernel format into the model's parameters and buffers of the same name."""
    items = list(weights)
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    problems, seen = [], set()
    for name, tensor in items:
        target = targets.get(name)
        if target is None:
            problems.append(f"{name!r}: no such parameter or buffer")
        elif name in seen:
            problems.append(f"{name!r}: given twice")
        elif tensor.shape != target.shape or tensor.dtype != target.dtype:
            problems.append(f"{name!r}: {tuple(tensor.shape)}/{tensor.dtype} != kernel {tuple(target.shape)}/{target.dtype}")
        seen.add(name)
    if problems:
        raise ValueError("kernel-format reload refused, nothing written: " + "; ".join(problems[:8]))
    with torch.no_grad():
        for name, tensor in items:
            target = targets[name]
            if tensor is not target:
                target.copy_(tensor)
    return seen
