"""Reload backends: how one sync's groups get into the engine's kernel storage.

A backend runs one sync as `begin()`, `load(group)` per layer group, `commit()`,
or `abort()` on failure. Two exist behind this interface:
- `"vllm"`: vLLM's own layerwise reload (`VLLMLayerwiseBackend`, here);
- `"rlsync"`: rlsync's capture/restore reload (`rlsync.reload`), which
  quantizes on arrival straight into kernel storage.
They are tested against each other: same kernel tensors, bit for bit.

The engine, not the backend, checks names and shapes before any load and that
every checkpoint tensor arrived exactly once; backends only move bytes.
"""

from __future__ import annotations

import abc
from typing import Any

import torch

from rlsync.engine import vllm_adapter
from rlsync.source.base import Group


class ReloadBackend(abc.ABC):
    """One sync session over an engine model."""

    name: str = ""

    def __init__(self) -> None:
        self.peak_live_bytes = 0
        """Most load-format bytes the backend held at once during the last sync."""

    @abc.abstractmethod
    def begin(self) -> None:
        """Start a sync: layers accept load-format weights from now on."""

    @abc.abstractmethod
    def load(self, group: Group) -> None:
        """Load one group of checkpoint-named full tensors."""

    @abc.abstractmethod
    def commit(self) -> None:
        """Finish the sync: process deferred layers, restore kernel tensors."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Leave every layer on kernel tensors after a failed sync (contents undefined)."""


class VLLMLayerwiseBackend(ReloadBackend):
    """vLLM's layerwise reload (`vllm.model_executor.model_loader.reload`).

    Fed in layer order it processes each layer as soon as it is complete; out of
    order it buffers whole layers until they are (limitation of that design).
    """

    name = "vllm"

    def __init__(self, model: torch.nn.Module, model_config: Any) -> None:
        super().__init__()
        self.model = model
        self.model_config = model_config

    def begin(self) -> None:
        self.peak_live_bytes = 0
        vllm_adapter.layerwise_begin(self.model)

    def load(self, group: Group) -> None:
        vllm_adapter.load_weights(self.model, group)
        self.peak_live_bytes = max(self.peak_live_bytes, vllm_adapter.layerwise_live_bytes(self.model))

    def commit(self) -> None:
        vllm_adapter.layerwise_finish(self.model, self.model_config)
        # vLLM's limitation 2: a tied LM head keeps kernel state from the old weights.
        vllm_adapter.refresh_tied_followers(self.model)

    def abort(self) -> None:
        # Finishing resets vLLM's per-layer reload state and puts kernel tensors
        # back; partially loaded layers are processed with whatever they hold.
        # The engine stays FAILED until a full sync overwrites everything.
        vllm_adapter.layerwise_finish(self.model, self.model_config)


def make_backend(name: str, model: torch.nn.Module, model_config: Any) -> ReloadBackend:
    """Build the reload backend called `name` for this engine model."""
    if name == "vllm":
        return VLLMLayerwiseBackend(model, model_config)
    if name == "rlsync":
        from rlsync.reload import Reload

        return Reload(model, model_config)
    raise ValueError(f"unknown reload_backend {name!r}; choose 'rlsync' or 'vllm'")
