"""Layouts: exact round trips through `to_standard_layout` / `from_standard_layout`.

Hypothesis draws shapes (odd ones, and ones not divisible by the block size),
packing (int2/int3/int4/int8 in 8/16/32-bit elements), transposition and scale
granularity; packed integers must come back unchanged and FP8 data plus scales
bit for bit.
"""

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlsync.quant import reference as ref
from rlsync.quant.layout import FP8, Layout, QuantizedTensor, ScaleSpec, pack, unpack

STORAGE = [torch.uint8, torch.int16, torch.int32]
SETTINGS = settings(max_examples=40, deadline=None)


def bits(t):
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def width(dtype):
    return torch.empty((), dtype=dtype).element_size() * 8


@st.composite
def scale_specs(draw):
    granularity = draw(st.sampled_from(["tensor", "channel", "block"]))
    block = (draw(st.integers(1, 9)), draw(st.integers(1, 9))) if granularity == "block" else None
    return ScaleSpec(granularity=granularity, block=block)


@given(n=st.integers(1, 33), k=st.integers(1, 70), value_bits=st.sampled_from([2, 3, 4, 8]),
       storage=st.sampled_from(STORAGE), transposed=st.booleans(), spec=scale_specs(), seed=st.integers(0, 2**16))
@SETTINGS
def test_packed_int_round_trip(n, k, value_bits, storage, transposed, spec, seed):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (value_bits - 1)), 1 << (value_bits - 1)
    values = torch.randint(lo, hi, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(spec.standard_shape(n, k), generator=gen)
    layout = Layout(value=f"int{value_bits}", dtype=storage, pack_factor=Fraction(width(storage), value_bits),
                    scale=spec, transposed=transposed, scale_transposed=transposed)
    std = QuantizedTensor(data=values, scale=scale, layout=layout.standard(), shape=(n, k))
    stored = layout.from_standard_layout(std)
    assert stored.data.dtype == storage
    rows, length = (k, n) if transposed else (n, k)
    assert stored.data.shape == (rows, -(-length * value_bits // width(storage)))
    back = layout.to_standard_layout(stored)
    assert torch.equal(back.data, values) and torch.equal(back.scale, scale)
    assert back.layout == layout.standard()


@given(n=st.integers(1, 300), k=st.integers(1, 300), spec=scale_specs(), transposed=st.booleans(),
       scale_transposed=st.booleans(), seed=st.integers(0, 2**16))
@SETTINGS
def test_fp8_round_trip_is_exact(n, k, spec, transposed, scale_transposed, seed):
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1).to(torch.bfloat16)
    if spec.granularity == "block":
        q, scale = ref.fp8_per_block(w, spec.block)
    elif spec.granularity == "channel":
        q, scale = ref.fp8_per_channel(w)
    else:
        q, scale = ref.fp8_per_tensor(w)
    assert tuple(scale.shape) == spec.standard_shape(n, k)
    layout = Layout(scale=spec, transposed=transposed, scale_transposed=scale_transposed)
    std = QuantizedTensor(data=q, scale=scale, layout=layout.standard(), shape=(n, k))
    stored = layout.from_standard_layout(std)
    back = layout.to_standard_layout(stored)
    assert torch.equal(bits(back.data), bits(q)) and torch.equal(bits(back.scale), bits(scale))
    # Dequantizing in any layout gives the same weight, bit for bit.
    assert torch.equal(stored.dequantize(), std.dequantize())
    # FP8 transposition is a view: no copy of the data.
    assert stored.data.data_ptr() == q.data_ptr()


def test_pack_factor_is_exact_fraction():
    int3 = Layout(value="int3", dtype=torch.uint8, pack_factor=Fraction(8, 3), scale=ScaleSpec(granularity="channel"))
    assert int3.pack_factor == Fraction(8, 3) and int3.packed
    assert Layout().pack_factor == 1 and not Layout().packed
    with pytest.raises(ValueError, match="packs 8/3"):
        Layout(value="int3", dtype=torch.uint8, pack_factor=Fraction(3), scale=ScaleSpec())
    with pytest.raises(ValueError, match="Fraction"):
        Layout(value="int4", dtype=torch.uint8, pack_factor=2, scale=ScaleSpec())
    with pytest.raises(ValueError, match="unknown value type"):
        Layout(value="int12", dtype=torch.int16, pack_factor=Fraction(4, 3), scale=ScaleSpec())
    with pytest.raises(ValueError, match="float8"):
        Layout(value=FP8, dtype=torch.uint8, pack_factor=Fraction(1), scale=ScaleSpec())


def test_scale_spec_validation():
    with pytest.raises(ValueError, match="granularity"):
        ScaleSpec(granularity="row")
    with pytest.raises(ValueError, match="block shape"):
        ScaleSpec(granularity="block")
    assert ScaleSpec(granularity="block", block=(128, 128)).standard_shape(300, 129) == (3, 2)
    assert ScaleSpec(granularity="tensor").standard_shape(300, 129, num_shards=3) == (3,)


def test_pack_rejects_out_of_range_and_wrong_element_count():
    with pytest.raises(ValueError, match="int4 range"):
        pack(torch.tensor([[8]], dtype=torch.int8), 4, torch.uint8)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack(torch.zeros(1, 3, dtype=torch.uint8), 4, 7)


def test_int3_bit_stream_is_little_endian_offset_binary():
    # Values -4..3 as offset binary 0..7; eight 3-bit fields fill exactly three bytes.
    values = torch.arange(-4, 4, dtype=torch.int8).reshape(1, 8)
    packed = pack(values, 3, torch.uint8)
    stream = sum(int(u) << (3 * i) for i, u in enumerate(range(8)))
    assert packed.tolist() == [[stream & 0xFF, (stream >> 8) & 0xFF, stream >> 16]]


def test_layout_mismatch_is_an_error():
    q, s = ref.fp8_per_channel(torch.randn(4, 4).bfloat16())
    std = QuantizedTensor(data=q, scale=s, layout=Layout(), shape=(4, 4))
    with pytest.raises(ValueError, match="not"):
        Layout(transposed=True).to_standard_layout(std)
