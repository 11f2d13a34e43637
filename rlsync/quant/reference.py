"""Reference FP8 (e4m3) quantizers, written in plain torch.

These define what "correct" means for every FP8 sync: after a sync, the
engine's FP8 kernel tensors must equal these functions' output bit for bit.
Where vLLM implements the same scheme, the arithmetic follows vLLM's exactly
(operation order, true division vs reciprocal multiply, clamps), so the results
are bit-identical; tests check that against vLLM's own functions.

Input is the tensor as the engine holds it before quantization: the trainer's
tensor cast to the engine dtype (bf16), because vLLM loads into bf16 storage
first and quantizes that.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
# vLLM clamps per-channel scales so an all-zero row never divides by zero.
_MIN_CHANNEL_SCALE = 1.0 / (FP8_MAX * 512)


def fp8_per_channel(weight_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel FP8: returns (`q_NK` e4m3, `scale_N1` fp32).

    Matches vLLM's online `fp8_per_channel`: amax over the input dim, scale =
    amax / 448 (true division by a 0-d fp32 tensor), clamped below at
    1/(448*512), then `(w / scale).clamp(-448, 448)` cast to e4m3.
    """
    if weight_NK.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight_NK.shape)}")
    lo, hi = weight_NK.aminmax(dim=-1, keepdim=True)
    amax = torch.maximum(lo.abs(), hi.abs()).to(torch.float32)
    fp8_max = torch.tensor(FP8_MAX, dtype=torch.float32, device=weight_NK.device)
    scale_N1 = (amax / fp8_max).clamp_min(1.0 / (fp8_max * 512))
    q_NK = (weight_NK / scale_N1).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q_NK, scale_N1


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`q * scale` with broadcasting (per tensor or per channel), in `dtype`."""
    return (q.to(torch.float32) * scale.to(torch.float32)).to(dtype)
