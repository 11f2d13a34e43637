"""The `vllm` reload backend: vLLM's own layerwise reload behind rlsync's interface.

Fed in layer order it processes each layer as soon as it is complete; out of
order it buffers whole layers until they are (a limitation of that design).
rlsync adds two fixes on top of vLLM 0.32:
1. a tied LM head keeps derived kernel state from the old weights, so commit
   re-derives tied followers;
2. an update of unquantized MoE experts skips the experts' kernel-format step
   (on CPU the grouped-GEMM prepack), leaving checkpoint-layout bytes in
   packed storage; the session runs it (`vllm_layers.expert_format_on_update`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection
from typing import Any

import torch

from rlsync.adapters import vllm_engine, vllm_layers, vllm_load
from rlsync.errors import SyncError
from rlsync.reload.backend import ReloadBackend, Weights


class VLLMLayerwiseBackend(ReloadBackend):
    """vLLM's layerwise reload (`vllm.model_executor.model_loader.reload`)."""

    name = "vllm"

    def __init__(self, model: torch.nn.Module, model_config: Any) -> None:
        super().__init__()
        self.model = model
        self.model_config = model_config
        self._fixes = contextlib.ExitStack()

    def begin(self) -> None:
        self.peak_live_bytes = 0
        self._fixes.enter_context(vllm_layers.expert_format_on_update(self.model))
        try:
            vllm_load.layerwise_begin(self.model)
        except BaseException:
            self._fixes.close()
            raise

    def load(self, group: Weights, check: Collection[str] = frozenset()) -> None:
        if check:
            raise SyncError(f"the vllm reload backend checks no copies; asked to check {sorted(check)[:3]}")
        vllm_engine.load_weights(self.model, group)
        self.peak_live_bytes = max(self.peak_live_bytes, vllm_load.layerwise_live_bytes(self.model))

    def commit(self) -> None:
        with self._fixes:
            vllm_load.layerwise_finish(self.model, self.model_config)
        # vLLM's limitation: a tied LM head keeps kernel state from the old weights.
        vllm_layers.refresh_tied_followers(self.model)

    def abort(self) -> None:
        # Finishing resets vLLM's per-layer reload state and puts kernel tensors
        # back; partially loaded layers are processed with whatever they hold.
        # The engine stays FAILED until a full sync overwrites everything.
        with self._fixes:
            vllm_load.layerwise_finish(self.model, self.model_config)
