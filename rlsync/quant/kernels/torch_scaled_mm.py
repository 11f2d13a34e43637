"""`torch_scaled_mm`: `torch._scaled_mm` with dynamic FP8 activations.

Per-token activation scales, or one per-tensor scale when the weight has a
single per-tensor scale. Runs where torch has the op for FP8 (CUDA SM89+, and
torch's CPU implementation, a reference loop). Tensor and channel weight
scales only: block scales run on `emulated`.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from rlsync.quant.kernels.base import Kernel, LinearDescriptor, register_kernel
from rlsync.quant.layout import FP8, Layout, QuantizedTensor, ScaleSpec
from rlsync.quant.reference import FP8_DTYPE, FP8_MAX, expand_scale


@functools.cache
def _torch_scaled_mm_works(device_type: str) -> tuple[bool, str]:
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        if torch.cuda.get_device_capability() < (8, 9):
            return False, f"FP8 matmul needs compute capability 8.9+, this GPU has {torch.cuda.get_device_capability()}"
        return True, ""
    a = torch.ones(1, 16, dtype=FP8_DTYPE, device=device_type)
    one = torch.ones((), dtype=torch.float32, device=device_type)
    try:
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as exc:
        return False, f"torch._scaled_mm does not run FP8 on {device_type}: {str(exc).splitlines()[0]}"
    return True, ""


def quantize_activation(x_2d: torch.Tensor, per_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic FP8 activation quantization: (`x_q` e4m3, scale (M, 1) or (1, 1)) fp32."""
    amax = x_2d.abs().amax(dim=-1, keepdim=True) if per_token else x_2d.abs().amax().reshape(1, 1)
    scale = (amax.to(torch.float32) / FP8_MAX).clamp_min(1.0 / (FP8_MAX * 512))
    return (x_2d.to(torch.float32) / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


@register_kernel
class TorchScaledMMKernel(Kernel):
    """`torch._scaled_mm`: tensorwise for one per-tensor scale, rowwise otherwise."""

    name = "torch_scaled_mm"

    @classmethod
    def is_supported(cls, device_type: str) -> tuple[bool, str]:
        return _torch_scaled_mm_works(device_type)

    @classmethod
    def can_implement(cls, desc: LinearDescriptor) -> tuple[bool, str]:
        if desc.weight_layout.value != FP8:
            return False, f"needs FP8 weights, not {desc.weight_layout.value}"
        if desc.weight_layout.scale.granularity == "block":
            return False, "runs tensor and channel scales only (block scales: use emulated, or vLLM's block kernels on GPU)"
        if desc.activation == "bf16":
            return False, "quantizes activations to FP8; weight-only (bf16) was asked for"
        if desc.out_dtype not in (torch.bfloat16, torch.float32):
            return False, f"outputs bf16 or fp32, not {desc.out_dtype}"
        n, k = desc.shape
        if desc.device == "cuda" and (n % 16 or k % 16):
            return False, f"cuBLASLt needs N and K multiples of 16, got {n}x{k}"
        return True, ""

    def _tensorwise(self) -> bool:
        return self.desc.weight_layout.scale.granularity == "tensor" and self.desc.num_shards == 1

    def exec_layout(self) -> Layout:
        spec = ScaleSpec(granularity="tensor" if self._tensorwise() else "channel")
        return Layout(scale=spec, transposed=True, scale_transposed=True)

    def adapt_standard(self, std: QuantizedTensor) -> QuantizedTensor:
        if self._tensorwise() or std.layout.scale.granularity == "channel":
            return std
        n, k = std.shape
        scale = expand_scale(std.scale, (n, k), granularity="tensor", widths=std.shard_widths)
        return dataclasses.replace(std, scale=scale, layout=Layout(scale=ScaleSpec(granularity="channel")))

    def apply(self, weight: QuantizedTensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x_2d = x.reshape(-1, x.shape[-1])
        tensorwise = self._tensorwise()
        x_q, x_scale = quantize_activation(x_2d, per_token=not tensorwise)
        w_scale = weight.scale.reshape(()) if tensorwise else weight.scale.reshape(1, -1).contiguous()
        out = torch._scaled_mm(x_q, weight.data, scale_a=x_scale.reshape(()) if tensorwise else x_scale,
                               scale_b=w_scale.to(torch.float32), out_dtype=self.desc.out_dtype)
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], out.shape[-1])
