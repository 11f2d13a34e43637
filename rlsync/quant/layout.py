"""How a quantized weight is stored, and the conversion to one standard form.

A checkpoint format decides how weights arrive; a kernel decides how it wants
them stored for execution. A `Layout` describes one storage form: the value
type (FP8 e4m3 or an n-bit signed integer), the storage dtype and how many
values share one storage element (`pack_factor`, a `Fraction`, so 3-bit values
in bytes are exactly 8/3 per byte), the scale granularity (per tensor, per
channel, per block of any shape) and whether data and scales are stored
transposed. Every layout converts `to_standard_layout()` (values unpacked, data
(N, K) row-major, scales in the standard shape) and back with
`from_standard_layout()`; kernels only ever need "standard -> mine", and a
kernel whose layout equals its input's skips the conversion altogether.

Standard scale shapes, for a weight of N output rows (shards of widths
`shard_widths`) and K inputs: tensor `(num_shards,)`, channel `(N, 1)`,
block `(ceil(N / bn), ceil(K / bk))`, all fp32.

Packing: signed n-bit values are stored offset-binary (`v + 2**(n-1)`, so
int4 covers [-8, 7]) as a little-endian bit stream along the stored tensor's
last dimension; each row starts on a fresh storage element and the tail of
its last element is zero. Rows of any length work, odd ones included.

Limitations:
1. Packing goes through a bit tensor (8 bytes per bit): exact and general, but
   meant for conversion and tests, not for a hot path.
2. Integer layouts are symmetric (no zero point); scales are fp32.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import torch

from rlsync.quant.reference import expand_scale

FP8 = "float8_e4m3fn"
_GRANULARITIES = ("tensor", "channel", "block")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ScaleSpec:
    """Which elements share one scale."""

    granularity: str = "channel"
    """`tensor` (one per shard), `channel` (one per output row) or `block`."""
    block: tuple[int, int] | None = None
    """(rows, cols) of one block; only for `block`."""

    def __post_init__(self) -> None:
        if self.granularity not in _GRANULARITIES:
            raise ValueError(f"scale granularity {self.granularity!r}: choose one of {', '.join(_GRANULARITIES)}")
        if (self.granularity == "block") != (self.block is not None):
            raise ValueError("a block shape is given exactly when granularity is 'block'")
        if self.block is not None and (len(self.block) != 2 or min(self.block) <= 0):
            raise ValueError(f"block shape must be two positive ints, got {self.block}")

    def standard_shape(self, n: int, k: int, num_shards: int = 1) -> tuple[int, ...]:
        if self.granularity == "tensor":
            return (num_shards,)
        if self.granularity == "channel":
            return (n, 1)
        bn, bk = self.block  # type: ignore[misc]
        return (math.ceil(n / bn), math.ceil(k / bk))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Layout:
    """One storage form of a quantized 2-D weight."""

    value: str = FP8
    """`float8_e4m3fn`, or `intN` for signed N-bit integers (N in 2..8)."""
    dtype: torch.dtype = torch.float8_e4m3fn
    """Storage element dtype."""
    pack_factor: Fraction = Fraction(1)
    """Values per storage element (storage bits / value bits)."""
    scale: ScaleSpec = ScaleSpec()
    """Scale granularity."""
    transposed: bool = False
    """Data stored as (K, N) instead of (N, K)."""
    scale_transposed: bool = False
    """Channel scales stored (1, N), block scales (K blocks, N blocks)."""

    def __post_init__(self) -> None:
        if not isinstance(self.pack_factor, Fraction):
            raise ValueError(f"pack_factor must be a fractions.Fraction, got {type(self.pack_factor).__name__}")
        want = Fraction(_storage_bits(self.dtype), self.bits)
        if self.pack_factor != want:
            raise ValueError(f"{self.value} in {self.dtype} packs {want} values per element, not {self.pack_factor}")
        if self.value == FP8 and self.dtype != torch.float8_e4m3fn:
            raise ValueError("FP8 values are stored as torch.float8_e4m3fn")

    @property
    def bits(self) -> int:
        if self.value == FP8:
            return 8
        if self.value.startswith("int") and self.value[3:].isdigit() and 2 <= int(self.value[3:]) <= 8:
            return int(self.value[3:])
        raise ValueError(f"unknown value type {self.value!r}; use {FP8!r} or intN with N in 2..8")

    @property
    def packed(self) -> bool:
        """More than one value per storage element."""
        return self.pack_factor != 1

    @property
    def bit_packed(self) -> bool:
        """Stored as an offset-binary bit stream (packed, or ints in another dtype than int8)."""
        return self.value != FP8 and (self.packed or self.dtype != torch.int8)

    def standard(self) -> Layout:
        """The standard layout for the same values and scales."""
        dtype = torch.float8_e4m3fn if self.value == FP8 else torch.int8
        return Layout(value=self.value, dtype=dtype, pack_factor=Fraction(_storage_bits(dtype), self.bits), scale=self.scale)

    def is_standard(self) -> bool:
        return self == self.standard()

    def to_standard_layout(self, qt: QuantizedTensor) -> QuantizedTensor:
        """`qt` (in this layout) as the standard layout; views where no copy is needed."""
        if qt.layout != self:
            raise ValueError(f"tensor is in layout {qt.layout}, not {self}")
        n, k = qt.shape
        data = qt.data
        if self.bit_packed:
            data = unpack(data, self.bits, k if not self.transposed else n)
        if self.transposed:
            data = data.t()
        scale = qt.scale.t() if self.scale_transposed and qt.scale.dim() == 2 else qt.scale
        return dataclasses.replace(qt, data=data, scale=scale, layout=self.standard())

    def from_standard_layout(self, qt: QuantizedTensor) -> QuantizedTensor:
        """`qt` (in the standard layout) stored in this layout."""
        if qt.layout != self.standard():
            raise ValueError(f"tensor is in layout {qt.layout}, not the standard {self.standard()}")
        data = qt.data.t() if self.transposed else qt.data
        if self.bit_packed:
            data = pack(data, self.bits, self.dtype)
        elif data.dtype != self.dtype:
            raise ValueError(f"standard data is {data.dtype}; layout stores {self.dtype}")
        scale = qt.scale.t() if self.scale_transposed and qt.scale.dim() == 2 else qt.scale
        return dataclasses.replace(qt, data=data, scale=scale, layout=self)


@dataclasses.dataclass(kw_only=True, slots=True)
class QuantizedTensor:
    """A quantized 2-D weight: data and scales in `layout`."""

    data: torch.Tensor
    scale: torch.Tensor
    layout: Layout
    shape: tuple[int, int]
    """Logical (N, K) of the weight."""
    shard_widths: tuple[int, ...] = ()
    """Output rows of each fused shard (per-tensor scales); empty means one shard."""

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, K) weight these values and scales stand for."""
        std = self.layout.to_standard_layout(self) if not self.layout.is_standard() else self
        spec = self.layout.scale
        full = expand_scale(std.scale.to(torch.float32), self.shape, granularity=spec.granularity,
                            widths=self.shard_widths, block=spec.block or (1, 1))
        return (std.data.to(torch.float32) * full).to(dtype)


def _storage_bits(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() * 8


def pack(values: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Pack signed `bits`-bit ints (any int dtype) along the last dim into `dtype` elements."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if values.numel() and (int(values.min()) < lo or int(values.max()) > hi):
        raise ValueError(f"values outside the int{bits} range [{lo}, {hi}]")
    width = _storage_bits(dtype)
    rows, length = values.shape
    unsigned = values.to(torch.int64) + (1 << (bits - 1))
    stream = ((unsigned.unsqueeze(-1) >> torch.arange(bits)) & 1).reshape(rows, length * bits)
    num_elems = math.ceil(length * bits / width)
    stream = torch.nn.functional.pad(stream, (0, num_elems * width - length * bits))
    words = (stream.reshape(rows, num_elems, width) << torch.arange(width)).sum(-1)
    if dtype.is_signed:  # two's complement view of the top bit
        words = torch.where(words >= 1 << (width - 1), words - (1 << width), words)
    return words.to(dtype)


def unpack(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of `pack`: the first `length` signed `bits`-bit ints of each row, as int8."""
    width = words.element_size() * 8
    rows, num_elems = words.shape
    if num_elems != math.ceil(length * bits / width):
        raise ValueError(f"{num_elems} storage elements per row cannot hold {length} int{bits} values")
    unsigned_words = words.to(torch.int64) & ((1 << width) - 1)
    stream = ((unsigned_words.unsqueeze(-1) >> torch.arange(width)) & 1).reshape(rows, num_elems * width)
    fields = stream[:, : length * bits].reshape(rows, length, bits)
    unsigned = (fields << torch.arange(bits)).sum(-1)
    return (unsigned - (1 << (bits - 1))).to(torch.int8)


def stacked_view(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The tensors as one (S, ...) view when they lie at even, non-overlapping steps in one storage, else None.

    Why: a sync hands over an MoE layer's experts as hundreds of tensors that transformers' reversed
    conversion leaves as evenly spaced views of one buffer (and their destinations in a fused expert
    weight are evenly spaced too); seen as one view, they take one copy or one quantizer call.
    """
    if not tensors:
        return None
    first = tensors[0]
    shape, stride, dtype = tuple(first.shape), first.stride(), first.dtype
    ptr = first.untyped_storage().data_ptr()
    span = 1 + sum((size - 1) * st for size, st in zip(shape, stride, strict=True)) if first.numel() else 0
    if first.numel() == 0 or any(st < 0 for st in stride):
        return None
    step = tensors[1].storage_offset() - first.storage_offset() if len(tensors) > 1 else span
    if step < span:
        return None
    for i, t in enumerate(tensors):
        if (tuple(t.shape) != shape or t.stride() != stride or t.dtype != dtype or t.device != first.device
                or t.untyped_storage().data_ptr() != ptr or t.storage_offset() != first.storage_offset() + i * step):
            return None
    return first.as_strided((len(tensors), *shape), (step, *stride), first.storage_offset())
