"""The reload backend interface: how one sync's groups get into an engine model's kernel storage.

A backend runs one sync as `begin()`, `load(group)` per layer group, `commit()`,
or `abort()` on failure. Two implement it, both in this package:
- `"rlsync"`: rlsync's capture/restore reload (`Reload`, `session.py`), which
  quantizes on arrival straight into kernel storage;
- `"vllm"`: vLLM's own layerwise reload (`VLLMLayerwiseBackend`, `vllm_backend.py`).
They are tested against each other: same kernel tensors, bit for bit.

A group is a plain sequence of `(checkpoint name, full tensor)` pairs: the
reload system knows nothing of trainers or sources. The caller (the engine)
checks names and shapes before any load and that every checkpoint tensor
arrived exactly once; backends only move bytes. The one check a backend may
take over is NaN / Inf, for tensors it writes with one plain copy
(`copy_checked`): that copy reads every element anyway.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Sequence

import torch

Weights = Sequence[tuple[str, torch.Tensor]]
"""One group of checkpoint-named full tensors."""

RELOAD_BACKENDS = ("rlsync", "vllm")
"""Backend names `make_backend` accepts."""


class ReloadBackend(abc.ABC):
    """One sync session over an engine model."""

    name: str = ""
    planned: bool | None = None
    """Whether the last sync replayed a recorded sync plan for every group (None: this backend has no plans)."""
    plan_note: str = ""
    """Why the last sync recorded (part of) its plan instead of replaying it ("" when it replayed or has none)."""

    def __init__(self) -> None:
        self.peak_live_bytes = 0
        """Most load-format bytes the backend held at once during the last sync."""

    @abc.abstractmethod
    def begin(self) -> None:
        """Start a sync: layers accept load-format weights from now on."""

    @abc.abstractmethod
    def load(self, group: Weights, check: Collection[str] = frozenset()) -> None:
        """Load one group of checkpoint-named full tensors.

        `check`: names from `copy_checked(group)` to refuse if they hold NaN or Inf
        (`rlsync.errors.NonFiniteError`, raised once the tensor is written)."""

    def copy_checked(self, group: Weights, among: Collection[str] | None = None) -> set[str]:
        """Names in `group` (of `among`, default all) that `load` writes with one plain copy of the whole tensor and
        can check for NaN / Inf while copying (`load(group, check=...)`). None by default."""
        return set()

    @abc.abstractmethod
    def commit(self) -> None:
        """Finish the sync: process deferred layers, restore kernel tensors."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Leave every layer on kernel tensors after a failed sync (contents undefined)."""
