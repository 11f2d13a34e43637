"""vLLM's quantization internals that rlsync's `rlsync_fp8` plugin builds on.

The plugin (`rlsync.quant.vllm_plugin`) is a vLLM quantization config: it
subclasses vLLM's `QuantizationConfig` / `LinearMethodBase`, registers itself
with `register_quantization_config`, creates `ModelWeightParameter`s, and may
run vLLM's own FP8 scaled-mm kernels. Those names are re-exported here, after
the version check, so the plugin imports vLLM only through this module.

The FP8 kernel helpers take plain values (scale granularity, shard count,
shape, dtypes), not rlsync's `LinearDescriptor`: adapters import no other
rlsync package.

Importing this module imports vLLM (the plugin and the `vllm` kernel import it
only once vLLM is in use).
"""

from __future__ import annotations

import types

import torch

from rlsync.adapters.vllm_engine import import_vllm
from rlsync.errors import ConfigError

import_vllm()  # the version check, before any internal below is touched

from vllm.model_executor.kernels.linear import _POSSIBLE_FP8_KERNELS, choose_scaled_mm_linear_kernel  # noqa: E402
from vllm.model_executor.kernels.linear.scaled_mm.cutlass import CutlassFP8ScaledMMLinearKernel  # noqa: E402
from vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel import (  # noqa: E402
    FP8ScaledMMLinearKernel,
    FP8ScaledMMLinearLayerConfig,
)
from vllm.model_executor.layers.fused_moe.activation import MoEActivation  # noqa: E402
from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG  # noqa: E402
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase  # noqa: E402
from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear  # noqa: E402
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts  # noqa: E402
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod  # noqa: E402
from vllm.model_executor.layers.quantization import register_quantization_config  # noqa: E402
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig  # noqa: E402
from vllm.model_executor.layers.quantization.utils.quant_utils import (  # noqa: E402
    kFp8DynamicTensorSym,
    kFp8DynamicTokenSym,
    kFp8StaticChannelSym,
    kFp8StaticTensorSym,
)
from vllm.model_executor.layers.quantization.utils.w8a8_utils import cutlass_fp8_supported  # noqa: E402
from vllm.model_executor.parameter import ModelWeightParameter  # noqa: E402
from vllm.model_executor.utils import set_weight_attrs  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402

__all__ = [
    "FP8ScaledMMLinearKernel",
    "FUSED_MOE_UNQUANTIZED_CONFIG",
    "FusedMoEMethodBase",
    "LinearBase",
    "LinearMethodBase",
    "ModelWeightParameter",
    "QuantizationConfig",
    "apply_fp8_kernel",
    "choose_fp8_kernel",
    "device_type",
    "make_fp8_kernel",
    "register_quantization_config",
    "RoutedExperts",
    "UnquantizedLinearMethod",
    "expert_problems",
    "is_router_gate",
    "set_weight_attrs",
]

ROUTER_GATE_LEAVES = ("shared_expert_gate",)
"""Plain linears that gate experts (Qwen2-MoE's shared-expert gate) besides vLLM's `GateLinear` routers."""


def is_router_gate(layer: torch.nn.Module, prefix: str) -> bool:
    """A linear that computes routing or expert-gating logits (kept in the engine dtype)."""
    return isinstance(layer, GateLinear) or prefix.rpartition(".")[2] in ROUTER_GATE_LEAVES


def expert_problems(layer: torch.nn.Module) -> list[str]:
    """Why rlsync's FP8 experts cannot compute `layer` (a `RoutedExperts`); empty when they can.

    rlsync's experts compute gated SiLU experts (`silu(x W1^T) * (x W3^T)`,
    then `W2`), without biases, expert parallelism or router weights applied to
    the input, without expert parallelism.
    """
    moe = layer.moe_config
    problems = []
    if not moe.is_act_and_mul or moe.activation != MoEActivation.SILU:
        problems.append(f"activation {moe.activation.value} (gated={moe.is_act_and_mul}); only gated silu")
    if moe.has_bias:
        problems.append("expert biases")
    if getattr(layer, "apply_router_weight_on_input", False):
        problems.append("router weights applied to the input")
    if moe.moe_parallel_config.use_ep:
        problems.append("expert parallelism; only tensor parallelism (every rank holds every expert's part)")
    if moe.num_experts != moe.num_local_experts:
        problems.append(f"{moe.num_experts} global vs {moe.num_local_experts} local experts (redundant or sharded)")
    return problems


def device_type() -> str:
    """vLLM's current platform device type (`cpu`, `cuda`, ...)."""
    return current_platform.device_type


def _keys(granularity: str, num_shards: int):
    if granularity == "tensor" and num_shards == 1:
        return kFp8StaticTensorSym, (kFp8DynamicTokenSym if cutlass_fp8_supported() else kFp8DynamicTensorSym)
    return kFp8StaticChannelSym, kFp8DynamicTokenSym


def _layer_config(granularity: str, num_shards: int, shape: tuple[int, int], act_dtype: torch.dtype,
                  out_dtype: torch.dtype) -> FP8ScaledMMLinearLayerConfig:
    weight_key, act_key = _keys(granularity, num_shards)
    return FP8ScaledMMLinearLayerConfig(weight_quant_key=weight_key, activation_quant_key=act_key,
                                        input_dtype=act_dtype, out_dtype=out_dtype, weight_shape=shape)


def choose_fp8_kernel(granularity: str, num_shards: int, shape: tuple[int, int], act_dtype: torch.dtype,
                      out_dtype: torch.dtype) -> tuple[type | None, str]:
    """vLLM's choice of FP8 scaled-mm kernel class for a layer, or None and why not."""
    if granularity == "block":
        return None, "vLLM's block-FP8 kernels repack weights after loading; rlsync keeps standard storage for in-place syncs"
    try:
        cls = choose_scaled_mm_linear_kernel(_layer_config(granularity, num_shards, shape, act_dtype, out_dtype),
                                             _POSSIBLE_FP8_KERNELS, quantization="fp8_w8a8")
    except ValueError as exc:
        return None, f"vLLM has no FP8 kernel for this layout here: {exc}"
    n, k = shape
    if cls.process_weights_after_loading is not FP8ScaledMMLinearKernel.process_weights_after_loading and not (
        issubclass(cls, CutlassFP8ScaledMMLinearKernel) and n % 16 == 0 and k % 16 == 0
    ):
        return None, f"vLLM's choice {cls.__name__} repacks weights after loading (in-place syncs cannot follow)"
    return cls, ""


def make_fp8_kernel(granularity: str, num_shards: int, shape: tuple[int, int], act_dtype: torch.dtype,
                    out_dtype: torch.dtype) -> FP8ScaledMMLinearKernel:
    """An instance of vLLM's kernel for the layer (inside a vLLM config context, as in create_weights)."""
    cls, reason = choose_fp8_kernel(granularity, num_shards, shape, act_dtype, out_dtype)
    if cls is None:
        raise ConfigError(f"vllm kernel: {reason}")
    return cls(_layer_config(granularity, num_shards, shape, act_dtype, out_dtype),
               layer_param_names=["weight", "weight_scale", "input_scale", "input_scale_ub"])


def apply_fp8_kernel(impl: FP8ScaledMMLinearKernel, weight_KN: torch.Tensor, scale: torch.Tensor, x: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """Run vLLM's kernel on views of rlsync's tensors ((K, N) weight, (N, 1) or (1,) scale)."""
    params = types.SimpleNamespace(weight=weight_KN, weight_scale=scale, input_scale=None, input_scale_ub=None)
    if not getattr(impl, "_rlsync_prepared", False):
        impl.process_weights_after_loading(params)  # a no-op for the kernels we accept (Cutlass: records N)
        impl._rlsync_prepared = True
    return impl.apply_weights(params, x, bias)
