"""The `vllm` reload backend: vLLM's own layerwise reload behind rlsync's interface.

Fed in layer order it processes each layer as soon as it is complete; out of
order it buffers whole layers until they are (a limitation of that design).
rlsync adds one fix on top: vLLM 0.32 leaves a tied LM head's derived kernel
state on the old weights, so commit re-derives tied followers.
"""

from __future__ import annotations

from typing import Any

import torch

from rlsync.adapters import vllm_engine, vllm_layers, vllm_load
from rlsync.reload.backend import ReloadBackend, Weights


class VLLMLayerwiseBackend(ReloadBackend):
    """vLLM's layerwise reload (`vllm.model_executor.model_loader.reload`)."""

    name = "vllm"

    def __init__(self, model: torch.nn.Module, model_config: Any) -> None:
        super().__init__()
        self.model = model
        self.model_config = model_config

    def begin(self) -> None:
        self.peak_live_bytes = 0
        vllm_load.layerwise_begin(self.model)

    def load(self, group: Weights) -> None:
        vllm_engine.load_weights(self.model, group)
        self.peak_live_bytes = max(self.peak_live_bytes, vllm_load.layerwise_live_bytes(self.model))

    def commit(self) -> None:
        vllm_load.layerwise_finish(self.model, self.model_config)
        # vLLM's limitation: a tied LM head keeps kernel state from the old weights.
        vllm_layers.refresh_tied_followers(self.model)

    def abort(self) -> None:
        # Finishing resets vLLM's per-layer reload state and puts kernel tensors
        # back; partially loaded layers are processed with whatever they hold.
        # The engine stays FAILED until a full sync overwrites everything.
        vllm_load.layerwise_finish(self.model, self.model_config)
