"""`vllm`: vLLM's own FP8 scaled-mm kernel for the layout, chosen by vLLM's selector.

vLLM's internals are reached through `rlsync.adapters.vllm_quant` only, and only
once this kernel is considered for a layer: importing this module imports no
vLLM (the adapter import sits in the methods for that reason, not for a cycle).

Limitation: tensor and channel scales only; vLLM's block-FP8 kernels repack
weights after loading, which in-place syncs cannot follow.
"""

from __future__ import annotations

import importlib.util

import torch

from rlsync.quant.kernels.base import Kernel, LinearDescriptor, register_kernel
from rlsync.quant.kernels.torch_scaled_mm import TorchScaledMMKernel
from rlsync.quant.layout import FP8, Layout, QuantizedTensor, ScaleSpec


def _adapter():
    from rlsync.adapters import vllm_quant  # imports vLLM: only when this kernel is in play

    return vllm_quant


def _args(desc: LinearDescriptor) -> tuple:
    return desc.weight_layout.scale.granularity, desc.num_shards, desc.shape, desc.act_dtype, desc.out_dtype


@register_kernel
class VLLMKernel(Kernel):
    """vLLM's FP8 scaled-mm kernel for this layout (selected by vLLM's own priority list)."""

    name = "vllm"

    @classmethod
    def is_supported(cls, device_type: str) -> tuple[bool, str]:
        if importlib.util.find_spec("vllm") is None:
            return False, "vLLM is not installed"
        try:
            _adapter()  # checks the vLLM version
        except RuntimeError as exc:
            return False, str(exc)
        return True, ""

    @classmethod
    def can_implement(cls, desc: LinearDescriptor) -> tuple[bool, str]:
        if desc.weight_layout.value != FP8:
            return False, f"needs FP8 weights, not {desc.weight_layout.value}"
        if desc.activation == "bf16":
            return False, "vLLM's W8A8 kernels quantize activations; weight-only (bf16) was asked for"
        kernel_cls, reason = _adapter().choose_fp8_kernel(*_args(desc))
        return (kernel_cls is not None), reason

    def __init__(self, desc: LinearDescriptor) -> None:
        super().__init__(desc)
        self.impl = _adapter().make_fp8_kernel(*_args(desc))

    def _tensorwise(self) -> bool:
        return self.desc.weight_layout.scale.granularity == "tensor" and self.desc.num_shards == 1

    def exec_layout(self) -> Layout:
        # vLLM's FP8 linear kernels read `weight` as (K, N) and channel scales as (N, 1).
        return Layout(scale=ScaleSpec(granularity="tensor" if self._tensorwise() else "channel"), transposed=True)

    adapt_standard = TorchScaledMMKernel.adapt_standard

    def apply(self, weight: QuantizedTensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _adapter().apply_fp8_kernel(self.impl, weight.data, weight.scale, x, bias)
