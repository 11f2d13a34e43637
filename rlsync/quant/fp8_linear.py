"""rlsync's FP8 linear scheme: its config, full quantization, quantize-on-arrival.

The vLLM plugin (`rlsync.quant.vllm_plugin`) stores every quantized linear in
the standard layout: `weight` e4m3 (N, K) and `weight_scale` fp32 in the
standard scale shape of the scheme (`tensor`: one per shard, `channel`: (N, 1),
`block`: (ceil(N/bn), ceil(K/bk))). This module holds the math on those
tensors, free of vLLM, so unit tests run it directly:

- `quantize_full`: the reference quantization of a whole (fused) bf16 weight;
  what vLLM's layerwise reload and the first load produce, and what `verify`
  compares against.
- `quantize_shard_into`: quantize-on-arrival. One incoming checkpoint tensor
  (a shard of a fused weight, or a whole weight) is cast to the engine dtype
  and quantized straight into its rows of the existing kernel tensors, in row
  chunks, so the extra memory is one chunk's temporaries (at most
  `CHUNK_ELEMS` elements) and never a layer buffer. Per-channel and per-block
  rows only depend on themselves; per-tensor keeps one scale per shard, so no
  shard waits for another (see `rlsync.quant.reference`). Per-channel and
  per-tensor arithmetic runs through `rlsync.quant.fused` (the reference
  compiled into one loop, same bits); per-block stays eager, which measured
  faster than its compiled form. Bits equal `quantize_full` for every scheme.

Limitations:
1. Block scheme on a fused layer: every shard but the last must start on a
   block-row boundary (a block may not straddle two checkpoint tensors), as
   for vLLM's block-FP8 checkpoints; otherwise `check_shards` raises.
2. Tensor parallel size 1 (each shard arrives whole).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rlsync.errors import ConfigError
from rlsync.quant import fused, reference
from rlsync.quant.kernels import ACTIVATIONS, KERNELS
from rlsync.quant.layout import Layout, ScaleSpec

NAME = "rlsync_fp8"
"""The plugin's `quantization=` name (and `quant_method` in its `quantization_config`)."""
SCHEMES = ("tensor", "channel", "block")
CHUNK_ELEMS = 4 * 1024 * 1024
"""Rows are quantized in chunks of about this many elements (bounds the fp32 temporaries)."""


@dataclasses.dataclass(kw_only=True, slots=True)
class Fp8Config:
    """How `quantization="rlsync_fp8"` quantizes and runs linear layers."""

    scheme: str = "channel"
    """Scale granularity: `tensor` (one per checkpoint tensor), `channel` or `block`."""
    block: tuple[int, int] = (128, 128)
    """Block shape (rows, cols) for `block`."""
    kernel: str | None = None
    """Force a kernel (`emulated`, `torch_scaled_mm`, `vllm`); None = per-platform priority."""
    activation: str = "auto"
    """`auto`, `bf16` (weight-only kernels) or `fp8_dynamic` (W8A8 kernels)."""

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"rlsync_fp8 scheme {self.scheme!r}: choose one of {', '.join(SCHEMES)}")
        self.block = tuple(int(b) for b in self.block)  # type: ignore[assignment]
        if len(self.block) != 2 or min(self.block) <= 0:
            raise ConfigError(f"rlsync_fp8 block {self.block}: two positive ints")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"rlsync_fp8 activation {self.activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        if self.kernel is not None and self.kernel not in KERNELS:
            raise ConfigError(f"rlsync_fp8 kernel {self.kernel!r}: choose one of {', '.join(sorted(KERNELS))}")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> Fp8Config:
        """From a `quantization_config` dict (the `quant_method` key is ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k != "quant_method"}
        for key in values:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                raise ConfigError(f"rlsync_fp8: unknown key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                                  + f" (keys: {', '.join(sorted(known))})")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": NAME, "scheme": self.scheme, "block": list(self.block),
                "kernel": self.kernel, "activation": self.activation}

    def layout(self) -> Layout:
        """The standard layout the plugin stores."""
        spec = ScaleSpec(granularity="block", block=self.block) if self.scheme == "block" else ScaleSpec(granularity=self.scheme)
        return Layout(scale=spec)

    def scale_shape(self, n: int, k: int, widths: Sequence[int]) -> tuple[int, ...]:
        return self.layout().scale.standard_shape(n, k, max(1, len(widths)))


def check_shards(config: Fp8Config, widths: Sequence[int]) -> None:
    """Raise `ConfigError` if the block scheme would put a block across two shards."""
    if config.scheme != "block":
        return
    bn = config.block[0]
    offset = 0
    for i, width in enumerate(widths[:-1]):
        offset += width
        if offset % bn:
            raise ConfigError(f"rlsync_fp8 block {config.block}: fused shard {i + 1} starts at row {offset}, "
                              f"not a multiple of {bn}; use a block height dividing {math.gcd(*widths)} or scheme 'channel'")


def quantize_full(config: Fp8Config, weight_NK: torch.Tensor, widths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (q e4m3 (N, K), scale) of a whole weight already in the engine dtype."""
    if config.scheme == "tensor":
        return reference.fp8_per_tensor_shards(weight_NK, list(widths) or [weight_NK.shape[0]])
    if config.scheme == "channel":
        return reference.fp8_per_channel(weight_NK)
    return reference.fp8_per_block(weight_NK, config.block)


def shard_index(shard_id: Any, num_shards: int) -> int:
    """vLLM's shard id (`q`/`k`/`v`, or an int for gate/up; None for unfused) -> shard index."""
    if shard_id is None:
        index = 0
    elif isinstance(shard_id, str):
        if shard_id not in ("q", "k", "v"):
            raise ValueError(f"unknown shard id {shard_id!r}")
        index = "qkv".index(shard_id)
    else:
        index = int(shard_id)
    if not 0 <= index < num_shards:
        raise ValueError(f"shard id {shard_id!r} out of range for {num_shards} shard(s)")
    return index


def quantize_shard_into(config: Fp8Config, q_NK: torch.Tensor, scale: torch.Tensor, widths: Sequence[int],
                        index: int, shard: torch.Tensor, dtype: torch.dtype, chunk_elems: int = CHUNK_ELEMS) -> None:
    """Quantize `shard` (rows of shard `index`, any dtype/device) into `q_NK` and `scale` in place."""
    widths = list(widths) or [q_NK.shape[0]]
    n_shard, k = widths[index], q_NK.shape[1]
    if tuple(shard.shape) != (n_shard, k):
        raise ValueError(f"shard {index} has shape {tuple(shard.shape)}, expected {(n_shard, k)}")
    start = sum(widths[:index])
    rows = q_NK[start:start + n_shard]

    def chunks(step: int):
        for r in range(0, n_shard, step):
            yield r, shard[r:r + step].to(device=q_NK.device, dtype=dtype)

    if config.scheme == "channel":
        for r, w in chunks(max(1, chunk_elems // k)):
            q, s = fused.fp8_per_channel(w)
            rows[r:r + len(w)].copy_(q)
            scale[start + r:start + r + len(w)].copy_(s)
    elif config.scheme == "block":
        bn, bk = config.block
        if start % bn:
            raise ValueError(f"shard {index} starts at row {start}, not on a {bn}-row block boundary")
        step = bn * max(1, chunk_elems // (bn * math.ceil(k / bk) * bk))
        for r, w in chunks(step):
            q, s = reference.fp8_per_block(w, config.block)  # compiled, this 4-D reduction ran slower
            rows[r:r + len(w)].copy_(q)
            scale[(start + r) // bn:(start + r) // bn + s.shape[0]].copy_(s)
    else:
        step = max(1, chunk_elems // k)
        lo_hi = [torch.stack(w.aminmax()).abs().max() for _, w in chunks(step)]
        s = reference.per_tensor_scale(torch.stack(lo_hi))  # amax of amaxes = amax of the shard, exactly
        for r, w in chunks(step):
            rows[r:r + len(w)].copy_(fused.quantize_with_tensor_scale(w, s))
        scale[index:index + 1].copy_(s)
