"""Linear kernels for quantized weights, and how one is chosen for a layer.

A `LinearDescriptor` states what a linear layer needs computed (weight layout,
shapes, shards, bias, activation handling, dtypes, device). Each kernel answers
`is_supported(device_type)` and `can_implement(descriptor)` with `(ok,
reason)`, owns `prep_weights_for_execution` (standard layout -> its own) and
`apply`. `choose_kernel` walks a per-platform priority list; a user override
(argument, i.e. the plugin's `kernel` config key, else the `RLSYNC_FP8_KERNEL`
environment variable) names one kernel instead; when nothing fits, the error
lists every kernel's reason.

Kernels here:
- `emulated`: dequantize to the activation dtype and `F.linear` (weight-only;
  any device, any layout). Cost per call: one fp32 and one bf16 copy of the
  weight, freed after the matmul; nothing is cached.
- `torch_scaled_mm`: `torch._scaled_mm` with dynamic FP8 activations (per
  token, or per tensor for a single per-tensor scale). Runs where torch has
  the op for FP8 (CUDA SM89+, and torch's CPU implementation).
- `vllm`: vLLM's own FP8 scaled-mm kernel for the layout, chosen by vLLM's
  selector (`rlsync.quant.vllm_plugin` is the only place that touches it).

Limitations:
1. `torch_scaled_mm` and `vllm` run tensor and channel scales; block scales
   run on `emulated` only (vLLM's block kernels repack weights after loading,
   which in-place syncs cannot follow).
2. Kernels only take views of the stored tensors (no repacked copies), so a
   sync that writes the stored tensors in place is seen by the next call.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import importlib.util
import os
from typing import ClassVar

import torch
import torch.nn.functional as F

from rlsync.errors import ConfigError
from rlsync.quant.layout import FP8, Layout, QuantizedTensor, ScaleSpec
from rlsync.quant.reference import FP8_DTYPE, FP8_MAX, expand_scale

KERNEL_ENV = "RLSYNC_FP8_KERNEL"
"""Environment variable naming a kernel to force (the config key wins when both are set)."""
ACTIVATIONS = ("auto", "bf16", "fp8_dynamic")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class LinearDescriptor:
    """The computation a quantized linear layer needs: y = x W^T + b."""

    weight_layout: Layout
    """Layout the weights are stored in (the plugin stores the standard layout)."""
    shape: tuple[int, int]
    """(N, K): output and input features."""
    shard_widths: tuple[int, ...] = ()
    """Output rows of each fused shard; empty means one shard."""
    has_bias: bool = False
    """Whether a bias is added."""
    activation: str = "auto"
    """`bf16` (weight-only), `fp8_dynamic` (activations quantized per call) or `auto`."""
    act_dtype: torch.dtype = torch.bfloat16
    """Activation (input) dtype."""
    out_dtype: torch.dtype = torch.bfloat16
    """Output dtype."""
    device: str = "cpu"
    """Device type the layer runs on (`cpu`, `cuda`)."""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation {self.activation!r}: choose one of {', '.join(ACTIVATIONS)}")

    @property
    def num_shards(self) -> int:
        return max(1, len(self.shard_widths))


class KernelDispatchError(ConfigError):
    """No kernel (or not the forced one) can run a descriptor; `reasons` maps kernel -> why."""

    def __init__(self, message: str, reasons: dict[str, str]) -> None:
        super().__init__(message + "; " + "; ".join(f"{k}: {v}" for k, v in reasons.items()))
        self.reasons = reasons


class Kernel(abc.ABC):
    """One way to run a quantized linear layer."""

    name: ClassVar[str] = ""

    def __init__(self, desc: LinearDescriptor) -> None:
        self.desc = desc

    @classmethod
    @abc.abstractmethod
    def is_supported(cls, device_type: str) -> tuple[bool, str]:
        """Whether this kernel runs on `device_type` here at all."""

    @classmethod
    @abc.abstractmethod
    def can_implement(cls, desc: LinearDescriptor) -> tuple[bool, str]:
        """Whether this kernel computes `desc` (assuming it is supported)."""

    @abc.abstractmethod
    def exec_layout(self) -> Layout:
        """The layout `apply` reads."""

    @abc.abstractmethod
    def apply(self, weight: QuantizedTensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`x @ W^T + bias` with `weight` in `exec_layout()`."""

    def adapt_standard(self, std: QuantizedTensor) -> QuantizedTensor:
        """Granularity changes this kernel needs on standard-layout weights (default: none)."""
        return std

    def prep_weights_for_execution(self, weight: QuantizedTensor) -> QuantizedTensor:
        """Standard (or any) layout -> this kernel's; a matching layout passes straight through."""
        target = self.exec_layout()
        if weight.layout == target:
            return weight
        std = weight if weight.layout.is_standard() else weight.layout.to_standard_layout(weight)
        return target.from_standard_layout(self.adapt_standard(std))


KERNELS: dict[str, type[Kernel]] = {}
"""Registered kernels by name."""

PRIORITY: dict[str, list[str]] = {
    # On CPU the dequantize+matmul path is the fastest (torch's CPU _scaled_mm is a reference loop).
    "cpu": ["emulated", "vllm", "torch_scaled_mm"],
    "cuda": ["vllm", "torch_scaled_mm", "emulated"],
}
"""Kernel names to try, best first, per device type."""


def register_kernel(cls: type[Kernel]) -> type[Kernel]:
    KERNELS[cls.name] = cls
    return cls


def check_kernel(cls: type[Kernel], desc: LinearDescriptor) -> tuple[bool, str]:
    ok, reason = cls.is_supported(desc.device)
    if not ok:
        return False, reason
    return cls.can_implement(desc)


def choose_kernel(desc: LinearDescriptor, override: str | None = None, *, priority: list[str] | None = None) -> Kernel:
    """The kernel for `desc`: the override if given (argument, else `RLSYNC_FP8_KERNEL`), else the first that fits."""
    override = override or os.environ.get(KERNEL_ENV) or None
    if override is not None and override not in KERNELS:
        raise ConfigError(f"unknown kernel {override!r} (from the `kernel` key or {KERNEL_ENV}); "
                          f"registered: {', '.join(sorted(KERNELS))}")
    names = priority if priority is not None else PRIORITY.get(desc.device, list(KERNELS))
    reasons: dict[str, str] = {}
    if override is not None:
        ok, reason = check_kernel(KERNELS[override], desc)
        if ok:
            return KERNELS[override](desc)
        reasons[override] = reason
    for name in names:
        if name in reasons:
            continue
        ok, reason = check_kernel(KERNELS[name], desc)
        if ok and override is None:
            return KERNELS[name](desc)
        reasons[name] = reason if not ok else "can implement (not chosen: another kernel was forced)"
    what = f"forced kernel {override!r} cannot run" if override else "no kernel can run"
    raise KernelDispatchError(f"{what} {_describe(desc)}", reasons)


def _describe(desc: LinearDescriptor) -> str:
    spec = desc.weight_layout.scale
    gran = spec.granularity + (f" {spec.block[0]}x{spec.block[1]}" if spec.block else "")
    return f"a {desc.shape[0]}x{desc.shape[1]} {desc.weight_layout.value} linear ({gran} scales, {desc.device})"


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


@register_kernel
class VLLMKernel(Kernel):
    """vLLM's FP8 scaled-mm kernel for this layout (selected by vLLM's own priority list)."""

    name = "vllm"

    @classmethod
    def is_supported(cls, device_type: str) -> tuple[bool, str]:
        if importlib.util.find_spec("vllm") is None:
            return False, "vLLM is not installed"
        try:
            from rlsync.quant import vllm_plugin  # noqa: F401  (checks the vLLM version)
        except RuntimeError as exc:
            return False, str(exc)
        return True, ""

    @classmethod
    def can_implement(cls, desc: LinearDescriptor) -> tuple[bool, str]:
        from rlsync.quant import vllm_plugin

        if desc.weight_layout.value != FP8:
            return False, f"needs FP8 weights, not {desc.weight_layout.value}"
        if desc.activation == "bf16":
            return False, "vLLM's W8A8 kernels quantize activations; weight-only (bf16) was asked for"
        kernel_cls, reason = vllm_plugin.choose_vllm_fp8_kernel(desc)
        return (kernel_cls is not None), reason

    def __init__(self, desc: LinearDescriptor) -> None:
        from rlsync.quant import vllm_plugin

        super().__init__(desc)
        self.impl = vllm_plugin.make_vllm_fp8_kernel(desc)

    def _tensorwise(self) -> bool:
        return self.desc.weight_layout.scale.granularity == "tensor" and self.desc.num_shards == 1

    def exec_layout(self) -> Layout:
        # vLLM's FP8 linear kernels read `weight` as (K, N) and channel scales as (N, 1).
        return Layout(scale=ScaleSpec(granularity="tensor" if self._tensorwise() else "channel"), transposed=True)

    adapt_standard = TorchScaledMMKernel.adapt_standard

    def apply(self, weight: QuantizedTensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from rlsync.quant import vllm_plugin

        return vllm_plugin.apply_vllm_fp8_kernel(self.impl, weight, x, bias)
