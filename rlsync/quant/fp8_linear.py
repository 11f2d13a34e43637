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
  A whole fused weight (Phi-3's `qkv_proj` / `gate_up_proj`, vLLM's shard id
  None) quantizes every shard at once.
- `PendingRows`: block scheme, a fused shard boundary inside a block row (q
  width 288, intermediate 520 with 128-row blocks): that block row straddles
  two or more shards, so it is quantized once all its parts have arrived, as
  vLLM's online block FP8 quantizes the fused weight. Until then, and between
  syncs, the layer holds fewer than one block height of rows per such
  boundary (see `PendingRows` for the bound and why it is kept).

Limitations:
1. Tensor parallel size 1 (each shard arrives whole).
2. Block scheme with straddling block rows: the held rows (at most
   `(bn - 1) * K` engine-dtype elements per boundary) live on the method, outside
   the reload's live-bytes accounting, and are kept between syncs.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rlsync.errors import ConfigError
from rlsync.quant import cpu_kernel, fused, reference
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
    """Raise `ConfigError` if `config` cannot quantize a layer with these fused shard widths.

    Every scheme fits any positive widths: a block that straddles two shards is
    quantized once both have arrived (`PendingRows`), so no block shape is refused.
    """
    if any(int(w) <= 0 for w in widths):
        raise ConfigError(f"rlsync_fp8 scheme {config.scheme!r}: fused shard widths {list(widths)} must be positive")


def quantize_full(config: Fp8Config, weight_NK: torch.Tensor, widths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (q e4m3 (N, K), scale) of a whole weight already in the engine dtype."""
    if config.scheme == "tensor":
        return reference.fp8_per_tensor_shards(weight_NK, list(widths) or [weight_NK.shape[0]])
    if config.scheme == "channel":
        return reference.fp8_per_channel(weight_NK)
    return reference.fp8_per_block(weight_NK, config.block)


def empty_kernel(config: Fp8Config, shape: tuple[int, int], widths: Sequence[int],
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialized kernel storage (e4m3 (N, K), fp32 scales; `shape` may lead with an expert dim) that
    quantize-on-arrival fills."""
    *lead, n, k = shape
    return (torch.empty(shape, dtype=reference.FP8_DTYPE, device=device),
            torch.empty((*lead, *config.scale_shape(n, k, widths)), dtype=torch.float32, device=device))


def shard_index(shard_id: Any, num_shards: int) -> int | None:
    """vLLM's shard id (`q`/`k`/`v`, or an int for gate/up) -> shard index.

    None (vLLM's id for a whole checkpoint tensor) is shard 0 of an unfused
    layer, and None (the whole fused weight, as Phi-3 stores it) for a fused one.
    """
    if shard_id is None:
        return 0 if num_shards == 1 else None
    if isinstance(shard_id, str):
        if shard_id not in ("q", "k", "v"):
            raise ValueError(f"unknown shard id {shard_id!r}")
        index = "qkv".index(shard_id)
    else:
        index = int(shard_id)
    if not 0 <= index < num_shards:
        raise ValueError(f"shard id {shard_id!r} out of range for {num_shards} shard(s)")
    return index


class PendingRows:
    """One fused layer's rows of block rows that straddle shards, until every part has arrived.

    A block row straddles when a shard boundary falls inside it (row offset not
    a multiple of the block height `bn`); its scales depend on the rows of every
    shard in it. For each such block row this keeps, per shard, the rows of that
    shard's latest arrival (engine dtype, kernel device). The arrival that makes
    every part present quantizes the block row from them and drops the oldest
    part, so a block row never holds all its parts after an arrival.

    Memory bound: fewer than `bn` rows per straddling block row, so at most
    `(bn - 1) * K` engine-dtype elements per shard boundary that is not a
    multiple of `bn` (`(bn - 1) * K * (num_shards - 1)` for the layer), held
    between syncs; the arrival that completes a block row briefly holds its `bn`
    rows.

    Why nothing is cleared when a layer looks complete: within one sync each
    shard arrives once. While a part of this sync is still to come, its held
    rows predate every part of this sync, so an earlier completion drops one of
    those older parts and never a part of this sync: the last part of a block
    row to arrive finds every other part of this sync and writes the right
    bits. Rows left by an aborted sync can only make an earlier arrival write a
    block row from old rows, which that last arrival rewrites. A rule that frees
    the rows once every shard has arrived cannot tell an aborted sync's part
    from this sync's and then misses that rewrite (abort after q; next sync k,
    v, q: q's block row would wait for a k that already came). `clear()` is
    only safe while no sync is half-way (a whole fused arrival, processing).
    """

    def __init__(self) -> None:
        self.parts: dict[int, dict[int, torch.Tensor]] = {}
        """Block row -> shard index -> rows, in arrival order."""

    def num_rows(self) -> int:
        return sum(len(rows) for parts in self.parts.values() for rows in parts.values())

    def clear(self) -> None:
        self.parts.clear()

    def arrive(self, block_row: int, index: int, rows: torch.Tensor, needed: Sequence[int]) -> torch.Tensor | None:
        """Hold `rows` as shard `index`'s part; the whole block row (parts in shard order) once all `needed` are held."""
        parts = self.parts.setdefault(block_row, {})
        parts.pop(index, None)
        parts[index] = rows  # last in arrival order
        if any(i not in parts for i in needed):
            return None
        whole = torch.cat([parts[i] for i in sorted(needed)])
        del parts[next(iter(parts))]  # the oldest part
        return whole


def quantize_shard_into(config: Fp8Config, q_NK: torch.Tensor, scale: torch.Tensor, widths: Sequence[int],
                        index: int | None, shard: torch.Tensor, dtype: torch.dtype, chunk_elems: int = CHUNK_ELEMS,
                        pending: PendingRows | None = None) -> None:
    """Quantize `shard` (rows of shard `index`, any dtype/device) into `q_NK` and `scale` in place.

    `index=None`: `shard` is the whole fused weight (every shard's rows).
    `pending`: the layer's `PendingRows`; needed by the block scheme when a
    shard boundary falls inside a block row (else ValueError).
    """
    widths = list(widths) or [q_NK.shape[0]]
    n, k = q_NK.shape
    if index is None:
        if tuple(shard.shape) != (n, k):
            raise ValueError(f"a whole fused weight (shards {widths}) has shape {(n, k)}, got {tuple(shard.shape)}; "
                             "a single shard needs its shard id")
        if config.scheme == "block":
            _block_rows_into(config, q_NK, scale, 0, shard, dtype, chunk_elems)
            if pending is not None:
                pending.clear()  # every block row is written; the layer is complete for this sync
            return
        start = 0
        for i, width in enumerate(widths):  # one scale per shard for `tensor`, rows alone for `channel`
            quantize_shard_into(config, q_NK, scale, widths, i, shard[start:start + width], dtype, chunk_elems)
            start += width
        return
    n_shard = widths[index]
    if tuple(shard.shape) != (n_shard, k):
        raise ValueError(f"shard {index} has shape {tuple(shard.shape)}, expected {(n_shard, k)}")
    start = sum(widths[:index])
    if config.scheme == "block":
        _block_shard_into(config, q_NK, scale, widths, index, start, shard, dtype, chunk_elems, pending)
        return
    rows = q_NK[start:start + n_shard]

    def chunks(step: int):
        for r in range(0, n_shard, step):
            yield r, shard[r:r + step].to(device=q_NK.device, dtype=dtype)

    if config.scheme == "channel":
        for r, w in chunks(max(1, chunk_elems // k)):
            if not cpu_kernel.channel_into(w, rows[r:r + len(w)], scale[start + r:start + r + len(w)]):
                q, s = fused.fp8_per_channel(w)
                rows[r:r + len(w)].copy_(q)
                scale[start + r:start + r + len(w)].copy_(s)
    else:
        step = max(1, chunk_elems // k)
        amaxes = [cpu_kernel.abs_max(w) for _, w in chunks(step)]
        finite = all(a is not None for a in amaxes)  # the C kernel took every chunk's amax: no NaN, no infinity
        lo_hi = amaxes if finite else [fused.abs_max(w) for _, w in chunks(step)]
        s = reference.per_tensor_scale(torch.stack(lo_hi))  # amax of amaxes = amax of the shard, exactly
        for r, w in chunks(step):
            if not (finite and cpu_kernel.tensor_into(w, s, rows[r:r + len(w)])):
                rows[r:r + len(w)].copy_(fused.quantize_with_tensor_scale(w, s))
        scale[index:index + 1].copy_(s)


def _block_rows_into(config: Fp8Config, q_NK: torch.Tensor, scale: torch.Tensor, row0: int, w_RK: torch.Tensor,
                     dtype: torch.dtype, chunk_elems: int) -> None:
    """Quantize whole block rows `w_RK` (starting at block-aligned row `row0`) in row chunks."""
    bn, bk = config.block
    assert row0 % bn == 0, "block rows start on a block boundary"
    k = q_NK.shape[1]
    step = bn * max(1, chunk_elems // (bn * math.ceil(k / bk) * bk))
    for r in range(0, len(w_RK), step):
        w = w_RK[r:r + step].to(device=q_NK.device, dtype=dtype)
        dst_q, dst_scale = q_NK[row0 + r:row0 + r + len(w)], scale[(row0 + r) // bn:(row0 + r) // bn + -(-len(w) // bn)]
        if not cpu_kernel.block_into(w, config.block, dst_q, dst_scale):
            q, s = reference.fp8_per_block(w, config.block)  # compiled, this 4-D reduction ran slower
            dst_q.copy_(q)
            dst_scale.copy_(s)


def _block_shard_into(config: Fp8Config, q_NK: torch.Tensor, scale: torch.Tensor, widths: Sequence[int], index: int,
                      start: int, shard: torch.Tensor, dtype: torch.dtype, chunk_elems: int,
                      pending: PendingRows | None) -> None:
    """Block scheme, one shard: its own block rows now, straddling ones through `pending`."""
    bn, n = config.block[0], q_NK.shape[0]
    end = start + len(shard)
    own_lo = -(-start // bn) * bn
    own_hi = end if end == n else end // bn * bn
    if own_lo < own_hi:
        _block_rows_into(config, q_NK, scale, own_lo, shard[own_lo - start:own_hi - start], dtype, chunk_elems)
    if end == start:
        return
    bounds = [sum(widths[:i]) for i in range(len(widths) + 1)]
    for b in sorted({start // bn, (end - 1) // bn}):
        lo, hi = b * bn, min((b + 1) * bn, n)
        if start <= lo and hi <= end:
            continue  # one of the shard's own block rows
        if pending is None:
            raise ValueError(f"shard {index} (rows {start}..{end}) shares block row {b} with another shard; "
                             "quantizing it needs the layer's PendingRows")
        needed = [i for i, w in enumerate(widths) if w and bounds[i] < hi and bounds[i + 1] > lo]
        rows = shard[max(lo, start) - start:min(hi, end) - start].to(device=q_NK.device, dtype=dtype, copy=True)  # no view of `shard`
        whole = pending.arrive(b, index, rows, needed)
        if whole is not None:
            q, s = reference.fp8_per_block(whole, config.block)
            q_NK[lo:hi].copy_(q)
            scale[b:b + 1].copy_(s)
