"""`rlsync.reload.stacked.derive`: a stack's recorded calls become one call only when one call per slice into one
parameter, and (for a copy) evenly spaced, disjoint, whole-slice copies say exactly the same writes."""

import torch

from rlsync.reload.plan import PlannedCall
from rlsync.reload.stacked import derive

SLICE = ((4, 8), (8, 1), 0)  # a contiguous (4, 8) slice, whole


def _call(expert, dst_offset, *, pname="w13_weight", shard="w1", src=SLICE, copies=True, layer="l0"):
    dst = ((4, 8), (8, 1), dst_offset)
    return PlannedCall(layer=layer, pname=pname, key=(pname, (("expert_id", expert), ("shard_id", shard))), numel=32,
                       loaded=src, args=(), kwargs={}, named={"shard_id": shard, "expert_id": expert},
                       copies=((dst, src),) if copies else None, whole=src == SLICE)


def test_evenly_spaced_whole_copies_become_one_view():
    stack = torch.zeros(3, 4, 8)
    sc = derive([(_call(e, 64 * e + 32),) for e in range(3)], stack)
    assert sc is not None and sc.dst == ((3, 4, 8), (64, 8, 1), 32)
    assert (sc.numel, sc.shard_id, sc.experts, len(sc.keys)) == (96, "w1", (0, 1, 2), 3)
    param = torch.arange(3 * 64 + 32.0)
    one_by_one, stacked = param.clone(), param.clone()
    src = torch.randn(3, 4, 8)
    for e in range(3):
        one_by_one[64 * e + 32:64 * e + 64].view(4, 8).copy_(src[e])
    stacked.as_strided(*sc.dst[:2], sc.dst[2]).copy_(src)
    assert torch.equal(one_by_one, stacked)


def test_anything_else_replays_slice_by_slice_or_as_a_loader_batch():
    stack = torch.zeros(3, 4, 8)
    assert derive([(_call(0, 0), _call(0, 32, shard="w3"))], stack[:1]) is None  # two calls for one slice
    assert derive([(_call(0, 0),), (_call(1, 32, pname="w2_weight"),)], stack[:2]) is None  # two parameters
    assert derive([(_call(0, 0),), (_call(0, 32),)], stack[:2]) is None  # one key twice
    assert derive([(_call(e, 16 * e),) for e in range(3)], stack).dst is None  # overlapping destinations
    assert derive([(_call(e, [0, 64, 192][e]),) for e in range(3)], stack).dst is None  # not evenly spaced
    part = ((2, 8), (8, 1), 0)  # a rank's part of each slice, not the whole slice
    assert derive([(_call(e, 64 * e, src=part),) for e in range(3)], stack).dst is None
    loader = derive([(_call(e, 0, copies=False),) for e in range(3)], stack)
    assert loader.dst is None and loader.experts == (0, 1, 2) and loader.shard_id == "w1"
    assert derive([(_call(e, 64 * e, shard=s),) for e, s in enumerate("abc")], stack).shard_id is None
    assert derive([(_call(e, 64 * i),) for i, e in enumerate((0, 2, 1))], stack).experts is None
