"""NaN / Inf checks shared by the engine (before a load) and the reload backend (while it copies).

Why one module: a sync refuses non-finite tensors (`EngineConfig.reject_nonfinite`),
and the check is a full pass over the bytes. For a tensor a sync plan writes
with one plain copy, the copy already reads every element, so the reload
backend checks it there (`copy_finite`) and the engine skips its own pass;
both sides must agree on what "finite" means, so both call this module.
"""

from __future__ import annotations

import torch

from rlsync.quant import cpu_kernel


def is_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in `tensor`, in one reduction pass: min and max propagate NaN, and an Inf is an extreme.

    Measured on this CPU for a 64 MiB bf16 tensor: `aminmax` 3.3 ms against 135 ms for
    `isfinite(t).all()` (which materializes a bool tensor on a slower path); bf16 on CPU (contiguous, or 2-D /
    3-D views with unit-stride rows) takes the C kernel's integer max over the bits.
    """
    if tensor.numel() == 0:
        return True
    fast = cpu_kernel.finite(tensor)
    if fast is not None:
        return fast
    lo, hi = torch.aminmax(tensor)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def copy_finite(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """`dst.copy_(src)`, then whether `src` holds no NaN and no Inf: one pass for bf16 CPU tensors the C kernel
    takes (`cpu_kernel.copy_finite`), else torch's copy and `is_finite`. `dst` is written either way."""
    with torch.no_grad():
        fused = cpu_kernel.copy_finite(dst, src)
        if fused is not None:
            return fused
        dst.copy_(src)
    return is_finite(src)
