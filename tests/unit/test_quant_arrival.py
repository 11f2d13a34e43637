"""Quantize-on-arrival: each shard lands in its rows of the existing kernel tensors.

Kernel tensors are poisoned with NaN first; shards arrive one at a time, in a
shuffled order, as fp32 (the trainer's dtype), with a tiny chunk size so the
row chunking is exercised. The result must equal the reference quantization
of the whole bf16 weight bit for bit, in the same storage (`data_ptr`).

Also: a whole fused weight arriving at once (Phi-3's `qkv_proj`, shard id
None), and block rows that straddle fused shards (q width 288, intermediate
520 with 128-row blocks), in every arrival order and after an aborted sync,
with the held rows under their stated bound.
"""

import itertools
import random

import pytest
import torch

from rlsync.errors import ConfigError
from rlsync.quant import reference as ref
from rlsync.quant.fp8_linear import (
    Fp8Config,
    PendingRows,
    check_shards,
    quantize_full,
    quantize_shard_into,
    shard_index,
)

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
        quantize_shard_into(cfg, q, scale, widths, i, shard, torch.bfloat16, chunk_elems=chunk_elems,
                            pending=PendingRows())
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


def test_check_shards_refuses_no_block_shape():
    for widths in ((96, 32, 32), (288, 96, 96), (520, 520), (128, 64)):
        check_shards(Fp8Config(scheme="block"), widths)  # straddling blocks are completed on arrival
    with pytest.raises(ConfigError, match="must be positive"):
        check_shards(Fp8Config(scheme="channel"), (96, 0, 32))


def test_shard_ids_and_shapes_are_checked():
    assert [shard_index(s, 3) for s in ("q", "k", "v")] == [0, 1, 2]
    assert shard_index(1, 2) == 1 and shard_index(None, 1) == 0
    assert shard_index(None, 3) is None  # the whole fused weight
    with pytest.raises(ValueError, match="out of range"):
        shard_index(2, 2)
    cfg = Fp8Config(scheme="channel")
    q, scale = torch.zeros(8, 4, dtype=ref.FP8_DTYPE), torch.zeros(8, 1)
    with pytest.raises(ValueError, match=r"expected \(4, 4\)"):
        quantize_shard_into(cfg, q, scale, (4, 4), 1, torch.zeros(4, 5), torch.bfloat16)


def poisoned(cfg, widths, k):
    n = sum(widths)
    return torch.full((n, k), float("nan")).to(ref.FP8_DTYPE), torch.full(cfg.scale_shape(n, k, widths), float("nan"))


def weight(widths, k, seed):
    gen = torch.Generator().manual_seed(seed)
    n = sum(widths)
    return torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 4


def assert_reference(cfg, q, scale, full_fp32, widths):
    want_q, want_scale = quantize_full(cfg, full_fp32.to(torch.bfloat16), widths)
    assert torch.equal(bits(q), bits(want_q)) and torch.equal(bits(scale), bits(want_scale))


def arrive(cfg, q, scale, widths, i, full, pending, chunk_elems=1 << 22, dtype=torch.float32):
    """Shard i of `full`, as its own tensor, poisoned after the call: held rows must be copies."""
    start = sum(widths[:i])
    shard = full[start:start + widths[i]].to(dtype).clone()
    quantize_shard_into(cfg, q, scale, widths, i, shard, torch.bfloat16, chunk_elems=chunk_elems, pending=pending)
    shard.fill_(float("nan"))


@pytest.mark.parametrize("scheme", ["tensor", "channel", "block"])
@pytest.mark.parametrize("widths,k", [((256, 128, 128), 256), ((288, 96, 96), 192), ((520, 520), 200), ((130,), 77)])
def test_whole_fused_arrival_equals_quantize_full(scheme, widths, k):
    """Phi-3 holds fused qkv_proj / gate_up_proj: vLLM calls the loader once with shard id None."""
    cfg = Fp8Config(scheme=scheme, block=(128, 128))
    full = weight(widths, k, seed=k)
    q, scale = poisoned(cfg, widths, k)
    pending = PendingRows()
    index = shard_index(None, len(widths))
    quantize_shard_into(cfg, q, scale, widths, index, full.clone(), torch.bfloat16, chunk_elems=5000, pending=pending)
    assert_reference(cfg, q, scale, full, widths)
    assert pending.num_rows() == 0


def test_whole_fused_arrival_of_another_shape_is_refused():
    cfg = Fp8Config(scheme="channel")
    q, scale = poisoned(cfg, (256, 128, 128), 64)
    with pytest.raises(ValueError, match=r"whole fused weight \(shards \[256, 128, 128\]\) has shape \(512, 64\), got \(384, 64\)"):
        quantize_shard_into(cfg, q, scale, (256, 128, 128), None, torch.zeros(384, 64), torch.bfloat16)


STRADDLING = [  # (widths, K, block): q 288 / hidden 192 / intermediate 520, a block row over three shards, K % bk != 0
    ((288, 96, 96), 192, (128, 128)),
    ((520, 520), 200, (128, 128)),
    ((200, 32, 32, 100), 64, (128, 32)),
    ((96, 32, 32), 72, (128, 64)),
]


def bound(widths, block):
    """The documented bound: fewer than one block height of rows per shard boundary inside a block row."""
    cuts = itertools.accumulate(widths[:-1])
    return sum(block[0] - 1 for c in cuts if c % block[0])


@pytest.mark.parametrize("widths,k,block", STRADDLING)
@pytest.mark.parametrize("chunk_elems", [700, 1 << 22])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_straddling_blocks_equal_quantize_full_in_every_order(widths, k, block, chunk_elems, dtype):
    cfg = Fp8Config(scheme="block", block=block)
    check_shards(cfg, widths)
    pending = PendingRows()
    q, scale = poisoned(cfg, widths, k)
    ptrs = (q.data_ptr(), scale.data_ptr())
    for step, order in enumerate(itertools.permutations(range(len(widths)))):  # one sync per order, same layer
        full = weight(widths, k, seed=step)
        for i in order:
            arrive(cfg, q, scale, widths, i, full, pending, chunk_elems, dtype)
            assert pending.num_rows() <= bound(widths, block)
        assert_reference(cfg, q, scale, full, widths)
    assert (q.data_ptr(), scale.data_ptr()) == ptrs


@pytest.mark.parametrize("widths,k,block", STRADDLING)
def test_an_aborted_sync_leaves_no_stale_rows_in_the_next(widths, k, block):
    """Sync 1 completes, sync 2 aborts after some shards, sync 3 (new values) arrives in any order."""
    cfg = Fp8Config(scheme="block", block=block)
    num = len(widths)
    orders = list(itertools.permutations(range(num)))
    for n_aborted in range(1, num):
        for aborted in random.Random(n_aborted).sample(orders, min(4, len(orders))):
            for final in orders:
                pending = PendingRows()
                q, scale = poisoned(cfg, widths, k)
                for sync, shards in enumerate([orders[0], aborted[:n_aborted], final]):
                    full = weight(widths, k, seed=100 * sync + n_aborted)
                    for i in shards:
                        arrive(cfg, q, scale, widths, i, full, pending)
                        assert pending.num_rows() <= bound(widths, block)
                assert_reference(cfg, q, scale, full, widths)


def test_straddling_shard_without_pending_rows_is_refused():
    cfg = Fp8Config(scheme="block", block=(128, 128))
    q, scale = poisoned(cfg, (288, 96, 96), 64)
    with pytest.raises(ValueError, match="shares block row 2 with another shard"):
        quantize_shard_into(cfg, q, scale, (288, 96, 96), 0, torch.zeros(288, 64), torch.bfloat16)
