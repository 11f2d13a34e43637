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
  selector (reached through `rlsync.adapters.vllm_quant`).

Files: `base.py` (descriptor, `Kernel`, registry), one file per kernel family
(`emulated.py`, `torch_scaled_mm.py`, `vllm.py`), and here the priority table
and `choose_kernel`.

Limitations:
1. `torch_scaled_mm` and `vllm` run tensor and channel scales; block scales
   run on `emulated` only (vLLM's block kernels repack weights after loading,
   which in-place syncs cannot follow).
2. Kernels only take views of the stored tensors (no repacked copies), so a
   sync that writes the stored tensors in place is seen by the next call.
"""

from __future__ import annotations

import os

from rlsync.errors import ConfigError
from rlsync.quant.kernels.base import (
    ACTIVATIONS,
    KERNEL_ENV,
    KERNELS,
    Kernel,
    KernelDispatchError,
    LinearDescriptor,
    check_kernel,
    register_kernel,
)
from rlsync.quant.kernels.emulated import EmulatedKernel
from rlsync.quant.kernels.torch_scaled_mm import TorchScaledMMKernel, quantize_activation
from rlsync.quant.kernels.vllm import VLLMKernel

__all__ = [
    "ACTIVATIONS",
    "KERNELS",
    "KERNEL_ENV",
    "PRIORITY",
    "EmulatedKernel",
    "Kernel",
    "KernelDispatchError",
    "LinearDescriptor",
    "TorchScaledMMKernel",
    "VLLMKernel",
    "check_kernel",
    "choose_kernel",
    "quantize_activation",
    "register_kernel",
]

PRIORITY: dict[str, list[str]] = {
    # On CPU the dequantize+matmul path is the fastest (torch's CPU _scaled_mm is a reference loop).
    "cpu": ["emulated", "vllm", "torch_scaled_mm"],
    "cuda": ["vllm", "torch_scaled_mm", "emulated"],
}
"""Kernel names to try, best first, per device type."""


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
