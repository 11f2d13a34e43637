"""Quantize-on-arrival: each shard lands in its rows of the existing kernel tensors.

Kernel tensors are poisoned with NaN first; shards arrive one at a time, in a
shuffled order, as fp32 (the trainer's dtype), with a tiny chunk size so the
row chunking is exercised. The result must equal the reference quantization
of the whole bf16 weight bit for bit, in the same storage (`data_ptr`).
"""

import random

import pytest
import torch

from rlsync.errors import ConfigError
from rlsync.quant import reference as ref
from rlsync.quant.fp8_linear import Fp8Config, check_shards, quantize_full, quantize_shard_into, shard_index

CASES = [  # (widths, K): fused qkv-like, gate_up-like, unfused, K not divisible by the block
    ((256, 128, 128), 256),
    ((96, 96), 200),
    ((130,), 77),
]


def bits(t):
    return t.contiguous().view(torch.uint8 if t.element_size() == 1 else torch.int32)


@pytest.mark.parametrize("scheme", ["tensor", "channel", "block"])
@pytest.mark.parametrize("widths,k", CASES)
@pytest.mark.parametrize("chunk_elems", [1000, 1 << 22])
def test_arrival_equals_reference_in_place(scheme, widths, k, chunk_elems):
    cfg = Fp8Config(scheme=scheme, block=(32, 64))
    check_shards(cfg, widths)
    n = sum(widths)
    gen = torch.Generator().manual_seed(len(widths) * k)
    full_fp32 = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)  # rows of different ranges
    want_q, want_scale = quantize_full(cfg, full_fp32.to(torch.bfloat16), widths)

    q = torch.full((n, k), float("nan")).to(ref.FP8_DTYPE)
    scale = torch.full(cfg.scale_shape(n, k, widths), float("nan"))
    ptrs = (q.data_ptr(), scale.data_ptr())
    order = list(range(len(widths)))
    random.Random(k).shuffle(order)
    starts = [sum(widths[:i]) for i in range(len(widths))]
    for i in order:
        shard = full_fp32[starts[i]:starts[i] + widths[i]].clone()
        quantize_shard_into(cfg, q, scale, widths, i, shard, torch.bfloat16, chunk_elems=chunk_elems)
    assert (q.data_ptr(), scale.data_ptr()) == ptrs
    assert torch.equal(bits(q), bits(want_q)) and torch.equal(bits(scale), bits(want_scale))


def test_per_tensor_shard_scales_are_independent():
    """Per-tensor scales are kept per shard: a later shard never changes an earlier one's bits."""
    cfg = Fp8Config(scheme="tensor")
    widths = (64, 32, 32)
    shards = [torch.randn(w, 48) * s for w, s in zip(widths, (0.01, 1.0, 100.0))]
    q = torch.zeros(128, 48, dtype=ref.FP8_DTYPE)
    scale = torch.zeros(3)
    quantize_shard_into(cfg, q, scale, widths, 0, shards[0], torch.bfloat16)
    first = bits(q[:64]).clone(), float(scale[0])
    quantize_shard_into(cfg, q, scale, widths, 2, shards[2], torch.bfloat16)
    quantize_shard_into(cfg, q, scale, widths, 1, shards[1], torch.bfloat16)
    assert torch.equal(bits(q[:64]), first[0]) and float(scale[0]) == first[1]
    for i in range(3):
        assert float(scale[i]) == float(ref.per_tensor_scale(shards[i].to(torch.bfloat16)))


def test_block_shard_must_start_on_a_block_row():
    with pytest.raises(ConfigError, match="fused shard 1 starts at row 96, not a multiple of 128"):
        check_shards(Fp8Config(scheme="block"), (96, 32, 32))
    check_shards(Fp8Config(scheme="block"), (128, 64))  # only the last shard may end mid-block
    check_shards(Fp8Config(scheme="channel"), (96, 32, 32))


def test_shard_ids_and_shapes_are_checked():
    assert [shard_index(s, 3) for s in ("q", "k", "v")] == [0, 1, 2]
    assert shard_index(1, 2) == 1 and shard_index(None, 1) == 0
    with pytest.raises(ValueError, match="out of range"):
        shard_index(2, 2)
    cfg = Fp8Config(scheme="channel")
    q, scale = torch.zeros(8, 4, dtype=ref.FP8_DTYPE), torch.zeros(8, 1)
    with pytest.raises(ValueError, match=r"expected \(4, 4\)"):
        quantize_shard_into(cfg, q, scale, (4, 4), 1, torch.zeros(4, 5), torch.bfloat16)
