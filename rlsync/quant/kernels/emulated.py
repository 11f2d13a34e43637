"""`emulated`: dequantize to the activation dtype, then `F.linear` (weight-only).

Runs on any device and any layout. Cost per call: one fp32 and one bf16 copy
of the weight, freed after the matmul; nothing is cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlsync.quant.kernels.base import Kernel, LinearDescriptor, register_kernel
from rlsync.quant.layout import Layout, QuantizedTensor


@register_kernel
class EmulatedKernel(Kernel):
    """Dequantize, then a plain matmul in the activation dtype (weight-only)."""

    name = "emulated"

    @classmethod
    def is_supported(cls, device_type: str) -> tuple[bool, str]:
        return True, ""

    @classmethod
    def can_implement(cls, desc: LinearDescriptor) -> tuple[bool, str]:
        if desc.activation == "fp8_dynamic":
            return False, "keeps activations in the input dtype (weight-only); fp8_dynamic was asked for"
        return True, ""

    def exec_layout(self) -> Layout:
        return self.desc.weight_layout.standard()

    def apply(self, weight: QuantizedTensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight.dequantize(x.dtype), bias)
