"""rlsync's FP8 mixture-of-experts weights: full quantization, quantize-on-arrival per expert, the forward.

A fused MoE layer holds every expert's weights stacked: `w13` (E, 2I, H), each
expert's gate (`w1`) rows then up (`w3`) rows, and `w2` (E, H, I). The
`rlsync_fp8` plugin stores each as e4m3 in the standard layout of
`rlsync.quant.fp8_linear`, expert by expert: expert e of `w13` is exactly the
fused linear weight (2I, H) with shard widths (I, I), and expert e of `w2` the
linear (H, I). So the scales are the linear scheme's, with an expert axis in
front (`tensor`: (E, 2) and (E, 1), one per expert and shard; `channel`:
(E, 2I, 1) and (E, H, 1); `block`: (E, ceil(2I/bn), ceil(H/bk)) and
(E, ceil(H/bn), ceil(I/bk))), and every bit equals `fp8_linear.quantize_full`
applied to each expert alone. This module holds that math, free of vLLM:

- `quantize_experts`: the reference for a whole stacked tensor (first load,
  vLLM's layerwise reload, verify);
- `quantize_expert_shard_into`: quantize-on-arrival. One checkpoint tensor
  (one expert's gate, up or down projection) goes straight into that expert's
  rows of the kernel tensors through `fp8_linear.quantize_shard_into`, so the
  extra memory is one chunk of one expert shard;
- `quantize_expert_shards_into`: the same for many experts' tensors of one
  shard id at once (a replayed sync plan hands a layer's shards over
  together): where they lie evenly in one storage, as transformers' reversed
  conversion leaves them, one quantizer call covers them all, written
  straight into the kernel rows (no stacked copy); otherwise one call each;
- `experts_forward`: route tokens to experts and run each expert's two
  linears through callables (the plugin passes the kernels chosen by
  `rlsync.quant.kernels.choose_kernel`, the same dispatch as linear layers).

Limitations:
1. Gated SiLU experts without biases (Qwen-MoE, Mixtral, DeepSeek-style
   routed experts); other activations are refused by the plugin.
2. No expert parallelism (every rank holds every expert; under tensor parallelism, its part of each).
3. The forward loops over the experts that received tokens: one matmul pair
   per active expert per call, not a grouped GEMM.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from rlsync.quant import cpu_kernel, fused
from rlsync.quant.fp8_linear import CHUNK_ELEMS, Fp8Config, PendingRows, quantize_full, quantize_shard_into
from rlsync.quant.layout import stacked_view

W13, W2 = "w13_weight", "w2_weight"
SHARD_INDEX = {"w1": 0, "w3": 1, "w2": 0}
"""vLLM's expert shard ids -> shard index within the expert's fused weight."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ExpertShapes:
    """Sizes of one fused MoE layer."""

    num_experts: int
    """Experts stored in the layer."""
    hidden: int
    """Model width H."""
    intermediate: int
    """Each expert's intermediate width I."""

    def widths(self, name: str) -> tuple[int, ...]:
        """Shard widths of one expert of `name` (`w13`: gate then up; `w2`: one shard)."""
        return (self.intermediate, self.intermediate) if name == W13 else (self.hidden,)

    def shape(self, name: str) -> tuple[int, int]:
        """(N, K) of one expert of `name`."""
        return (2 * self.intermediate, self.hidden) if name == W13 else (self.hidden, self.intermediate)

    def scale_shape(self, config: Fp8Config, name: str) -> tuple[int, ...]:
        return (self.num_experts, *config.scale_shape(*self.shape(name), self.widths(name)))


def quantize_experts(config: Fp8Config, w_ENK: torch.Tensor, widths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (q e4m3 (E, N, K), scales (E, ...)) of stacked experts already in the engine dtype."""
    if w_ENK.shape[0] == 0:
        raise ValueError("no experts to quantize")
    pairs = [quantize_full(config, w_NK, widths) for w_NK in w_ENK]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])


def quantize_expert_shard_into(config: Fp8Config, q_ENK: torch.Tensor, scale: torch.Tensor, widths: Sequence[int],
                               expert: int, shard_id: str, loaded: torch.Tensor, dtype: torch.dtype,
                               pending: Sequence[PendingRows] | None = None) -> None:
    """Quantize one expert's checkpoint tensor (`shard_id` `w1`, `w3` or `w2`) into its rows, in place."""
    if shard_id not in SHARD_INDEX:
        raise ValueError(f"unknown expert shard id {shard_id!r} (expected one of {', '.join(SHARD_INDEX)})")
    if not 0 <= expert < q_ENK.shape[0]:
        raise ValueError(f"expert {expert} out of range for {q_ENK.shape[0]} experts")
    index = SHARD_INDEX[shard_id]
    if index >= len(widths):
        raise ValueError(f"shard id {shard_id!r} does not belong to a weight with {len(widths)} shard(s)")
    quantize_shard_into(config, q_ENK[expert], scale[expert], widths, index, loaded, dtype,
                        pending=pending[expert] if pending is not None else None)


def quantize_expert_shards_into(config: Fp8Config, q_ENK: torch.Tensor, scale: torch.Tensor, widths: Sequence[int],
                                shard_id: str, experts: Sequence[int], shards: Sequence[torch.Tensor] | torch.Tensor,
                                dtype: torch.dtype, pending: Sequence[PendingRows] | None = None,
                                chunk_elems: int = CHUNK_ELEMS) -> None:
    """`quantize_expert_shard_into` for each (expert, shard), same bits, in as few calls as the layout allows.

    One call covers a run of consecutive experts whose tensors are one strided view (`stacked_view`, or
    `shards` given as one (E, ...) tensor), in the engine dtype on the kernel's device, for the tensor and
    channel schemes; it writes into the kernel rows and scales directly, `chunk_elems` elements at a time.
    Anything else goes shard by shard.
    """
    stackable = config.scheme in ("tensor", "channel")
    if isinstance(shards, torch.Tensor):
        stacked = shards if stackable else None
    else:
        stacked = stacked_view(shards) if stackable else None
    if len(experts) != len(shards):
        raise ValueError(f"{len(experts)} expert ids for {len(shards)} tensors")
    consecutive = all(b == a + 1 for a, b in zip(experts, experts[1:], strict=False))
    if (stacked is None or not consecutive or stacked.dtype != dtype or stacked.device != q_ENK.device
            or shard_id not in SHARD_INDEX or not experts or not 0 <= experts[0] <= experts[-1] < q_ENK.shape[0]):
        for expert, shard in zip(experts, shards.unbind(0) if isinstance(shards, torch.Tensor) else shards, strict=True):
            quantize_expert_shard_into(config, q_ENK, scale, widths, int(expert), shard_id, shard, dtype, pending)
        return
    index = SHARD_INDEX[shard_id]
    if index >= len(widths):
        raise ValueError(f"shard id {shard_id!r} does not belong to a weight with {len(widths)} shard(s)")
    n, k = widths[index], q_ENK.shape[2]
    if tuple(stacked.shape[1:]) != (n, k):
        raise ValueError(f"expert shard {shard_id!r} has shape {tuple(stacked.shape[1:])}, expected {(n, k)}")
    start, e0 = sum(widths[:index]), int(experts[0])
    step = max(1, chunk_elems // (n * k))
    for s in range(0, len(experts), step):
        rows = slice(e0 + s, e0 + min(s + step, len(experts)))
        dst_scale = scale[rows, start:start + n] if config.scheme == "channel" else scale[rows, index:index + 1]
        if not cpu_kernel.stacked_into(config.scheme, stacked[s:s + step], q_ENK[rows, start:start + n], dst_scale):
            fused.stacked_fp8_into(config.scheme, stacked[s:s + step], q_ENK[rows, start:start + n], dst_scale)


Linear = Callable[[int, torch.Tensor], torch.Tensor]
"""fn(expert, x (T, K)) -> x @ W_e^T (T, N)."""


def experts_forward(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, gate_up: Linear,
                    down: Linear) -> torch.Tensor:
    """Sum over each token's chosen experts of weight * down(silu(gate) * up)."""
    out = torch.zeros_like(x)
    for expert in torch.unique(topk_ids).tolist():
        if expert < 0:
            continue  # a slot routed to no local expert
        tokens, slots = (topk_ids == expert).nonzero(as_tuple=True)
        h = gate_up(expert, x[tokens])
        i = h.shape[-1] // 2
        y = down(expert, F.silu(h[..., :i]) * h[..., i:])
        acc = torch.promote_types(y.dtype, torch.float32)  # weight the expert outputs in at least fp32
        out.index_add_(0, tokens, (y.to(acc) * topk_weights[tokens, slots, None].to(acc)).to(out.dtype))
    return out
