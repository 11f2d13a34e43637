"""vLLM layers after processing: read kernel tensors, re-process, tied heads, derived state.

What a reload or a verify must know about a vLLM layer once
`process_weights_after_loading` ran: how to read a weight the CPU kernels
repacked into a oneDNN handle, which state processing derives (and rebuilds),
how to re-run processing, which layers are tied followers or deferred
attention, and which quant-method types vLLM uses for unquantized layers and
its own online FP8 (`quant_method_types`), so callers key registries by type,
never by class-name strings.
"""

from __future__ import annotations

import sys

import torch


def quant_method_types() -> dict[str, tuple[type, ...]]:
    """vLLM's quant-method classes by role, for registries keyed by type.

    - `unquantized`: methods whose kernel tensors hold the engine-dtype weight
      (linear, embedding / LM head);
    - `fp8_per_channel_online`: vLLM's online per-channel FP8 linear
      (`quantization="fp8_per_channel"`), whose kernel weight is the (K, N)
      transpose of the e4m3 weight with (N, 1) fp32 scales.
    Callers only ask once vLLM is loaded (an engine exists); an empty tuple
    for a role means this vLLM has no such class.
    """
    if "vllm" not in sys.modules:
        return {"unquantized": (), "fp8_per_channel_online": ()}
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.quantization.online.fp8 import Fp8PtpcOnlineLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    return {
        "unquantized": (UnquantizedLinearMethod, UnquantizedEmbeddingMethod),
        "fp8_per_channel_online": (Fp8PtpcOnlineLinearMethod,),
    }


_EXTRA_UNQUANTIZED: set[type] = set()


def register_unquantized_method(cls: type) -> type:
    """Declare that `cls`'s processing keeps the engine-dtype weight and only derives state from it
    (like vLLM's unquantized methods); usable as a class decorator."""
    _EXTRA_UNQUANTIZED.add(cls)
    return cls


def unquantized_method_types() -> tuple[type, ...]:
    """vLLM's unquantized method types plus those declared with `register_unquantized_method`."""
    return quant_method_types()["unquantized"] + tuple(_EXTRA_UNQUANTIZED)


def is_unquantized_method(method: object) -> bool:
    """The layer's quant method keeps engine-dtype weights (or the layer has none)."""
    return method is None or isinstance(method, unquantized_method_types())


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
        if not is_unquantized_method(method):
            raise RuntimeError(f"tied module {type(module).__name__} with {type(method).__name__}: refresh unsupported")
        dropped = drop_derived_state(module)
        method.process_weights_after_loading(module)
        _check_rebuilt(module, dropped)


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
