"""Reference FP8 (e4m3) quantizers, written in plain torch.

These define what "correct" means for every FP8 sync: after a sync, the
engine's FP8 kernel tensors must equal these functions' output bit for bit.
Where vLLM implements the same scheme, the arithmetic follows vLLM's exactly
(operation order, true division vs reciprocal multiply, clamps), so the results
are bit-identical; `tests/unit/test_quant_reference.py` checks that against
vLLM's own functions (named in each docstring below).

Input is the tensor as the engine holds it before quantization: the trainer's
tensor cast to the engine dtype (bf16), because vLLM loads into bf16 storage
first and quantizes that.

Fused layers (`qkv_proj`, `gate_up_proj`) and per-tensor scales: the engine
receives the fused weight as separate checkpoint tensors (shards), one at a
time. rlsync's per-tensor scheme keeps **one scale per checkpoint tensor**
(`fp8_per_tensor_shards`), never one scale over the fused weight, so each
shard is quantized the moment it arrives and no shard is re-quantized later.
For a layer with one shard this is exactly vLLM's per-tensor online FP8; for a
fused layer it differs from vLLM's (which takes one amax over the fused
weight) by design.

Limitations:
1. Per-tensor: an all-zero tensor (where vLLM's formula divides by zero and
   yields NaN) gets scale `float32.tiny`, so its FP8 values are all zero.
2. Block: the block shape is free here, but vLLM's kernels only run 128x128.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
# vLLM clamps per-channel scales so an all-zero row never divides by zero.
_MIN_CHANNEL_SCALE = 1.0 / (FP8_MAX * 512)
# vLLM's per-block cast clamps each block's amax below at 1e-4.
_MIN_BLOCK_AMAX = 1e-4
_TINY = torch.finfo(torch.float32).tiny


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """torch's cast to e4m3, the definition every quantizer here uses (`cast=`).

    The `cast` and `fp8_max` keywords of the quantizers below exist for their
    compiled variants (`rlsync.quant.fused`): an integer-arithmetic cast with the
    same bits (`rlsync.quant.e4m3`), and 448 as a runtime tensor, which keeps
    Inductor's GPU code from turning `amax / 448` into a multiply by a rounded
    reciprocal. Called without them, each function is the plain definition.
    """
    return x.to(FP8_DTYPE)


Cast = Callable[[torch.Tensor], torch.Tensor]


def _fp8_max(device: torch.device, fp8_max: torch.Tensor | None) -> torch.Tensor:
    return torch.tensor(FP8_MAX, dtype=torch.float32, device=device) if fp8_max is None else fp8_max


def abs_max(weight: torch.Tensor) -> torch.Tensor:
    """max |w| over the whole tensor, 0-d, in `weight`'s dtype (exact: max and abs do not round)."""
    lo, hi = weight.aminmax()
    return torch.maximum(lo.abs(), hi.abs())


def _check_2d(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")


def channel_amax(weight_NK: torch.Tensor) -> torch.Tensor:
    """Per-output-channel absolute max, (N, 1) fp32."""
    lo, hi = weight_NK.aminmax(dim=-1, keepdim=True)
    return torch.maximum(lo.abs(), hi.abs()).to(torch.float32)


def fp8_per_channel(weight_NK: torch.Tensor, amax_N1: torch.Tensor | None = None, *, cast: Cast = to_fp8,
                    fp8_max: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel FP8: returns (`q_NK` e4m3, `scale_N1` fp32).

    Matches vLLM's online `fp8_per_channel`: amax over the input dim, scale =
    amax / 448 (true division by a 0-d fp32 tensor), clamped below at
    1/(448*512), then `(w / scale).clamp(-448, 448)` cast to e4m3.
    `amax_N1`: the channels' amax when it is not this weight's own (vLLM's
    row-parallel shards under tensor parallelism take it over the whole row).
    """
    _check_2d(weight_NK)
    amax = channel_amax(weight_NK) if amax_N1 is None else amax_N1
    fp8_max = _fp8_max(weight_NK.device, fp8_max)
    scale_N1 = (amax / fp8_max).clamp_min(1.0 / (fp8_max * 512))
    q_NK = cast((weight_NK / scale_N1).clamp_(-FP8_MAX, FP8_MAX))
    return q_NK, scale_N1


def per_tensor_scale(weight: torch.Tensor) -> torch.Tensor:
    """The per-tensor scale, shape (1,) fp32: amax / 448 (true division), as vLLM's online per-tensor FP8."""
    lo, hi = weight.aminmax()
    amax = torch.maximum(lo.abs(), hi.abs()).reshape(1).to(torch.float32)
    fp8_max = torch.tensor(FP8_MAX, dtype=torch.float32, device=weight.device)
    return (amax / fp8_max).clamp_min(_TINY)


def quantize_with_tensor_scale(weight: torch.Tensor, scale_1: torch.Tensor, *, cast: Cast = to_fp8) -> torch.Tensor:
    """`(w.float() * scale.reciprocal()).clamp(-448, 448)` cast to e4m3.

    This is vLLM's static per-tensor quantization (`QuantFP8.forward_native`;
    the CUDA `static_scaled_fp8_quant` multiplies by the inverted scale too).
    """
    return cast((weight.to(torch.float32) * scale_1.to(torch.float32).reciprocal()).clamp_(-FP8_MAX, FP8_MAX))


def stacked_fp8_into(scheme: str, w_SNK: torch.Tensor, q_SNK: torch.Tensor, scale: torch.Tensor, *,
                     cast: Cast = to_fp8, fp8_max: torch.Tensor | None = None) -> None:
    """`fp8_per_channel` (scale (S, N, 1)) or `fp8_per_tensor` (scale (S, 1)) of each of S stacked weights,
    written into `q_SNK` and `scale` (views of kernel storage), with no per-weight call.

    The same operations as the 2-D functions applied to each `w_SNK[s]` alone (reductions over that
    weight only, the same elementwise steps), so the bits are theirs; `tests/unit/test_quant_experts.py`
    checks it. Why: expert layers send hundreds of small shards; one call for all of them costs per byte.
    """
    fp8_max = _fp8_max(w_SNK.device, fp8_max)
    if scheme == "channel":
        lo, hi = w_SNK.aminmax(dim=-1, keepdim=True)
        amax = torch.maximum(lo.abs(), hi.abs()).to(torch.float32)
        s = (amax / fp8_max).clamp_min(1.0 / (fp8_max * 512))
        q_SNK.copy_(cast((w_SNK / s).clamp_(-FP8_MAX, FP8_MAX)))
        scale.copy_(s)
    elif scheme == "tensor":
        lo, hi = w_SNK.reshape(w_SNK.shape[0], -1).aminmax(dim=-1)
        amax = torch.maximum(lo.abs(), hi.abs()).reshape(-1, 1).to(torch.float32)
        s = (amax / fp8_max).clamp_min(_TINY)
        q_SNK.copy_(cast((w_SNK.to(torch.float32) * s.reciprocal()[:, :, None]).clamp_(-FP8_MAX, FP8_MAX)))
        scale.copy_(s)
    else:
        raise ValueError(f"stacked quantization covers the tensor and channel schemes, not {scheme!r}")


def fp8_per_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor FP8: returns (`q` e4m3, `scale_1` fp32 of shape (1,)).

    Matches vLLM's `Fp8PerTensorOnlineLinearMethod`: scale from
    `per_tensor_scale`, values from `quantize_with_tensor_scale`.
    """
    _check_2d(weight)
    scale_1 = per_tensor_scale(weight)
    return quantize_with_tensor_scale(weight, scale_1), scale_1


def fp8_per_tensor_shards(weight_NK: torch.Tensor, widths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor FP8 of a fused weight: one scale per shard (checkpoint tensor).

    Rows `[sum(widths[:i]), sum(widths[:i+1]))` form shard i; returns (`q_NK`,
    `scale_S` fp32 with one entry per shard). With one shard this equals
    `fp8_per_tensor`. This is the definition the engine's per-tensor kernel
    tensors are verified against (see the module docstring for why).
    """
    _check_2d(weight_NK)
    if sum(widths) != weight_NK.shape[0]:
        raise ValueError(f"shard widths {list(widths)} do not sum to {weight_NK.shape[0]} rows")
    q_NK = torch.empty(weight_NK.shape, dtype=FP8_DTYPE, device=weight_NK.device)
    scale_S = torch.empty(len(widths), dtype=torch.float32, device=weight_NK.device)
    start = 0
    for i, n in enumerate(widths):
        q_NK[start:start + n], scale_S[i:i + 1] = fp8_per_tensor(weight_NK[start:start + n])
        start += n
    return q_NK, scale_S


def fp8_per_block(weight_NK: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block FP8: returns (`q_NK` e4m3, `scale_nk` fp32 of shape (ceil(N/bn), ceil(K/bk))).

    Matches `vllm.utils.deep_gemm.per_block_cast_to_fp8` (what vLLM's online
    `fp8_per_block` calls): zero-pad to whole blocks, amax per block clamped
    below at 1e-4, scale = amax / 448 (a Python-float divisor, as vLLM writes
    it), values `w * (1 / scale)` cast to e4m3 without a clamp. Tail blocks of
    shapes not divisible by the block size see the zero padding, so their
    scales come from the real elements only.
    """
    _check_2d(weight_NK)
    n, k = weight_NK.shape
    bn, bk = block
    if bn <= 0 or bk <= 0:
        raise ValueError(f"block shape must be positive, got {block}")
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    padded = torch.zeros((nb * bn, kb * bk), dtype=weight_NK.dtype, device=weight_NK.device)
    padded[:n, :k] = weight_NK
    view = padded.view(-1, bn, kb, bk)
    amax = view.abs().float().amax(dim=(1, 3), keepdim=True).clamp(_MIN_BLOCK_AMAX)
    scale = amax / FP8_MAX
    q = (view * (1.0 / scale)).to(FP8_DTYPE)
    return q.view_as(padded)[:n, :k].contiguous(), scale.view(nb, kb)


def expand_scale(scale: torch.Tensor, shape: tuple[int, int], *, granularity: str,
                 widths: Sequence[int] = (), block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """A scale broadcastable to `shape` (N, K): (N, 1) for tensor/channel, (N, K) for block."""
    n, k = shape
    if granularity == "tensor":
        counts = torch.tensor(list(widths) or [n], device=scale.device)
        return scale.reshape(-1).repeat_interleave(counts).reshape(n, 1)
    if granularity == "channel":
        return scale.reshape(n, 1)
    if granularity == "block":
        bn, bk = block
        return scale.repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]
    raise ValueError(f"unknown scale granularity {granularity!r}; choose tensor, channel or block")


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`q * scale` with broadcasting (per tensor or per channel), in `dtype`."""
    return (q.to(torch.float32) * scale.to(torch.float32)).to(dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - approx|^2)."""
    ref = reference.to(torch.float64)
    noise = (ref - approx.to(torch.float64)).pow(2).sum()
    signal = ref.pow(2).sum()
    if noise == 0:
        return math.inf
    return float(10 * torch.log10(signal / noise))
