"""vLLM's model loading, as rlsync's reload backends need it.

Where to hook the load-format capture (`capture_at_load`), which vLLM config is
being built, the weight loaders underneath vLLM's wrappers, vLLM's own
layerwise reload (the `vllm` backend) and vLLM's checkpoint iterator. Every
function names the vLLM 0.32 internal it relies on.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from rlsync.adapters.vllm_engine import import_vllm


@contextlib.contextmanager
def capture_at_load(callback: Callable[[torch.nn.Module], None]) -> Iterator[None]:
    """Run `callback(model)` wherever vLLM records reload metadata while building a model.

    vLLM 0.32 calls `record_metadata_for_reloading(model)` from
    `model_loader.utils.initialize_model` right after constructing the model
    and before loading and processing weights: the moment the load format is
    visible. In-process (colocated) engines resolve that name from the module
    at call time, so replacing it for the duration of `vllm.LLM(...)` runs the
    callback at the same moment. vLLM's own recording still runs first (its
    layerwise backend needs it). The original is restored on exit.
    """
    import_vllm()
    from vllm.model_executor.model_loader import utils as loader_utils

    original = loader_utils.record_metadata_for_reloading

    def record_and_capture(model: torch.nn.Module) -> None:
        original(model)
        callback(model)

    loader_utils.record_metadata_for_reloading = record_and_capture
    try:
        yield
    finally:
        loader_utils.record_metadata_for_reloading = original


def current_vllm_config() -> Any | None:
    """The vLLM config being built right now (set while vLLM constructs a model), else None."""
    if "vllm.config" not in sys.modules:
        return None
    from vllm.config import get_current_vllm_config_or_none

    return get_current_vllm_config_or_none()


def original_weight_loader(loader: Callable | None) -> Callable | None:
    """`loader` without vLLM's layerwise `online_process_loader` wrappers.

    vLLM's online quantization wraps loaders at `create_weights` time (before
    our capture runs); calling the wrapper later would feed vLLM's own reload
    bookkeeping, so rlsync always calls the function underneath.
    """
    while loader is not None and getattr(loader, "__name__", "") == "online_process_loader":
        loader = loader.__wrapped__
    return loader


def default_weight_loader() -> Callable:
    """vLLM's loader for parameters that set none (norms): checks shape, copies."""
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader as loader

    return loader


def checkpoint_weights(vllm_config: Any, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's checkpoint from disk, through vLLM's own model loader (lazy iterator)."""
    from vllm.model_executor.model_loader import get_model_loader

    loader = get_model_loader(vllm_config.load_config)
    return loader.get_all_weights(vllm_config.model_config, model)


def layerwise_begin(model: torch.nn.Module) -> None:
    """vLLM's layerwise reload: put every layer back in load format on meta."""
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    initialize_layerwise_reload(model)


def layerwise_finish(model: torch.nn.Module, config) -> None:
    """Process deferred layers, restore kernel tensors, reset reload state."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    finalize_layerwise_reload(model, config)


def layerwise_live_bytes(model: torch.nn.Module) -> int:
    """Bytes vLLM's layerwise reload holds buffered right now (any device)."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    total = 0
    for layer in model.modules():
        info = LAYERWISE_INFO.get(layer)
        if info is None:
            continue
        for _, args in info.loaded_weights:
            for value in args.arguments.values():
                if isinstance(value, torch.Tensor) and not value.is_meta:
                    total += value.nbytes
    return total
