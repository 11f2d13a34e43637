"""The one module that touches vLLM's internals, with the version check.

rlsync runs vLLM in the trainer's process (colocated). Reaching the model object
(`llm.llm_engine.model_executor.driver_worker.model_runner.model`) and vLLM's
layerwise reload functions are internals that move between vLLM releases, so
every such access lives here and is guarded by `SUPPORTED_VLLM`. Everything
else in rlsync talks to vLLM through `vllm.LLM`'s public API or this module.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

SUPPORTED_VLLM = ("0.32",)
"""vLLM release lines whose internals this adapter was written against."""


def import_vllm():
    """Import vLLM for in-process (colocated) use, with rlsync's defaults.

    `VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps the engine core in this process so
    the model object is reachable; a 1 GiB CPU KV cache keeps tests small. Both
    only apply where the user has not set them.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm

    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"rlsync's vLLM adapter supports vLLM {', '.join(v + '.x' for v in SUPPORTED_VLLM)}; "
            f"found {vllm.__version__}"
        )
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
        raise RuntimeError("colocated sync needs VLLM_ENABLE_V1_MULTIPROCESSING=0 (engine in this process)")
    return vllm


def build_llm(model_path: str, **llm_kwargs: Any):
    """`vllm.LLM(model_path, **llm_kwargs)` in this process."""
    vllm = import_vllm()
    return vllm.LLM(model_path, **llm_kwargs)


def model_runner(llm):
    return llm.llm_engine.model_executor.driver_worker.model_runner


def driver_model(llm) -> torch.nn.Module:
    """The `nn.Module` vLLM executes (rank-local, in this process)."""
    return model_runner(llm).model


def model_config(llm):
    return model_runner(llm).vllm_config.model_config


def packed_modules_mapping(model: torch.nn.Module) -> dict[str, list[str]]:
    """Fused engine module -> checkpoint modules, e.g. `qkv_proj -> [q_proj, k_proj, v_proj]`."""
    return dict(getattr(model, "packed_modules_mapping", {}) or {})


def load_weights(model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """vLLM's own name mapping and weight loaders (HF names -> fused params)."""
    return set(model.load_weights(iter(weights)) or ())


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


def native_reload_weights(llm, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """vLLM's own in-place reload from an iterator: `initialize_layerwise_reload`,
    `model.load_weights`, `finalize_layerwise_reload` in one model-runner call.

    rlsync does not sync this way (no validation, no tied-head refresh); the
    benchmarks use it as the baseline vLLM users have today.
    """
    model_runner(llm).reload_weights(weights_iterator=weights)


def reset_prefix_cache(llm) -> None:
    """Drop cached prefix KV blocks (computed with weights that just changed)."""
    llm.reset_prefix_cache()


def sleep(llm, level: int) -> None:
    llm.sleep(level=level)


def wake_up(llm, tags: list[str] | None = None) -> None:
    llm.wake_up(tags=tags)


def read_kernel_tensor(module: torch.nn.Module, name: str) -> torch.Tensor:
    """A parameter's values as the kernel computes with them.

    On CPU, vLLM repacks unquantized linear weights into an opaque oneDNN
    handle (`layer.cpu_linear`) and leaves an empty `weight`. We read those back
    exactly by multiplying with the identity: every output element is one bf16
    weight times 1 accumulated in fp32, so `cpu_linear(I) = W^T` bit for bit.
    """
    tensor = getattr(module, name)
    if name == "weight" and hasattr(module, "cpu_linear"):
        k = tensor.shape[1] if tensor.numel() else module.input_size_per_partition
        eye = torch.eye(k, dtype=tensor.dtype, device=tensor.device)
        return module.cpu_linear(eye, tensor, None).t().contiguous()
    return tensor


def tied_followers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules that share a parameter registered first by another module (a tied LM head)."""
    owner: dict[int, torch.nn.Module] = {}
    followers = []
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in owner and owner[id(param)] is not module:
                followers.append(module)
                break
            owner.setdefault(id(param), module)
    return followers


def refresh_tied_followers(model: torch.nn.Module) -> None:
    """Re-run processing for tied followers after a reload.

    A reload loads the shared tensor through its first owner only, so a
    follower whose processing derived kernel state from it (vLLM's CPU
    `UnquantizedEmbeddingMethod` packs the LM head into a oneDNN handle) keeps
    the old weights. Re-processing an unquantized follower only re-derives
    that state from the (already updated) shared tensor.
    """
    for module in tied_followers(model):
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        if not type(method).__name__.startswith("Unquantized"):
            raise RuntimeError(f"tied module {type(module).__name__} with {type(method).__name__}: refresh unsupported")
        dropped = drop_derived_state(module)
        method.process_weights_after_loading(module)
        _check_rebuilt(module, dropped)


# ------------------------------------------------- rlsync's reload backend
# `rlsync.reload` keeps its own capture of every layer's load format; the few
# vLLM facts it needs (where to hook the capture, how loaders are wrapped, how a
# layer is processed) live below.


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


def is_deferred_attention_layer(layer: torch.nn.Module) -> bool:
    """Attention layers whose processing vLLM defers until every other layer is done.

    Without `vllm.model_executor.layers.attention` imported no object can be
    one of its layers, so hand-built test models never import vLLM here.
    """
    if "vllm.model_executor.layers.attention" not in sys.modules:
        return False
    from vllm.model_executor.layers.attention import is_deferred_attention_layer as is_deferred

    return is_deferred(layer)


DERIVED_STATE_ATTRS = ("cpu_linear",)
"""Layer attributes that processing derives from the weights and rebuilds every time it runs.

vLLM 0.32's CPU `dispatch_cpu_unquantized_gemm` (unquantized linears, embeddings,
LM heads) sets `layer.cpu_linear`, a closure holding a oneDNN / sgl / zentorch
handle with its own copy of the weight (64 MiB for a 32768 x 1024 bf16 LM head).
"""


def drop_derived_state(layer: torch.nn.Module) -> list[str]:
    """Delete the derived state processing is about to rebuild; the names deleted.

    Processing builds the new handle while the layer still refers to the old
    one unless it is dropped first: two weight copies alive at once.
    """
    return [attr for attr in DERIVED_STATE_ATTRS if layer.__dict__.pop(attr, None) is not None]


def _check_rebuilt(layer: torch.nn.Module, dropped: list[str]) -> None:
    missing = [attr for attr in dropped if attr not in layer.__dict__]
    if missing:
        raise RuntimeError(f"{type(layer).__name__}: processing did not rebuild {missing} after a reload")


def process_layer(layer: torch.nn.Module) -> None:
    """Run the layer's `process_weights_after_loading` again, as vLLM's loader does.

    Online quantization methods skip processing once a layer carries
    `_already_called_process_weights_after_loading`, so the flag is cleared
    first. Derived state (`DERIVED_STATE_ATTRS`) is dropped first so the old
    and the new handle never coexist; processing that fails to rebuild it
    raises. Processing may create fresh parameters stamped with the global TP
    rank; `update_param_tp_status` re-reconciles them like vLLM's loader does.
    """
    layer.__dict__.pop("_already_called_process_weights_after_loading", None)
    method = getattr(layer, "quant_method", None)
    if method is None:
        return
    dropped = drop_derived_state(layer)
    method.process_weights_after_loading(layer)
    _check_rebuilt(layer, dropped)
    if hasattr(layer, "update_param_tp_status"):
        layer.update_param_tp_status()


def checkpoint_weights(vllm_config: Any, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's checkpoint from disk, through vLLM's own model loader (lazy iterator)."""
    from vllm.model_executor.model_loader import get_model_loader

    loader = get_model_loader(vllm_config.load_config)
    return loader.get_all_weights(vllm_config.model_config, model)
