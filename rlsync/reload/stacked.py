"""A replayed sync plan's runs of experts as one call: the engine side of `rlsync.source.stacked`.

Why: with a plan, an MoE layer's 768 per-expert checkpoint tensors cost the
same Python per tensor (plan lookup, claim, count, views, batch) as a dense
layer's 7, so a 256-expert sync took twice as long as an 8-expert one with the
same bytes. When the source says which items are one tensor's slices (a
`Stack`), and their recorded calls are one call each into one parameter, the
stack is replayed as one call: one destination view for a plain copy, one
`rlsync_stacked` call for a quantizing expert loader. Same writes, same
claims and counts as the calls one by one (`tests/unit/test_reload_stacked.py`
compares them bit for bit).

What it does not do: record. Recording stays per tensor through vLLM's
loaders; a `StackedCall` is derived from those per-name recordings (`derive`)
the first time a stack is replayed, and dropped with them. A recording sync
of FP8 experts replays its own deferred loader calls that way right after
recording them (`rlsync.reload.recording.Deferred`).

Limitations:
1. A stack whose slices took more than one call each, or calls into several
   parameters, or copies that are not evenly spaced whole slices (a tensor-
   parallel rank's part of each expert), replays slice by slice.
"""

from __future__ import annotations

import dataclasses

import torch

from rlsync.reload.plan import Geometry, PlannedCall


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class StackedCall:
    """The recorded calls of one stack's slices (one each, one parameter), as one call."""

    layer: str
    pname: str
    calls: tuple[PlannedCall, ...]
    """Slice i's call (what a replay slice by slice runs)."""
    keys: frozenset
    """Their claim keys (all different)."""
    numel: int
    """Load-format elements they count together."""
    dst: Geometry | None
    """Every call is one copy of its whole slice, at evenly spaced, disjoint places in the parameter: those
    places as one (S, ...) view; else None."""
    shard_id: object
    """The calls' common `shard_id` argument (None when absent or not common)."""
    experts: tuple[int, ...] | None
    """The calls' `expert_id`s when they are consecutive ints, else None."""

    def calls_keys(self) -> list[tuple]:
        """The claim keys in slice order (to name the first one already claimed)."""
        return [c.key for c in self.calls]


def derive(calls: list[tuple[PlannedCall, ...]], tensor: torch.Tensor) -> StackedCall | None:
    """One `StackedCall` for a stack of `tensor`'s slices whose recorded calls are `calls[i]`, or None."""
    if not calls or any(len(c) != 1 for c in calls):
        return None
    flat = [c[0] for c in calls]
    first = flat[0]
    if any((c.layer, c.pname) != (first.layer, first.pname) for c in flat):
        return None
    keys = frozenset(c.key for c in flat)
    if len(keys) != len(flat):
        return None
    shard_ids = {repr(c.named.get("shard_id")) for c in flat}
    experts = [c.named.get("expert_id") for c in flat]
    consecutive = all(isinstance(e, int) for e in experts) and all(b == a + 1 for a, b in zip(experts, experts[1:]))
    return StackedCall(layer=first.layer, pname=first.pname, calls=tuple(flat), keys=keys,
                       numel=sum(c.numel for c in flat), dst=_stacked_copy(flat, tensor),
                       shard_id=first.named.get("shard_id") if len(shard_ids) == 1 else None,
                       experts=tuple(experts) if consecutive else None)


def _stacked_copy(calls: list[PlannedCall], tensor: torch.Tensor) -> Geometry | None:
    whole = (tuple(tensor.shape[1:]), tuple(tensor.stride()[1:]), 0)
    if any(c.copies is None or len(c.copies) != 1 or c.copies[0][1] != whole for c in calls):
        return None
    dsts = [c.copies[0][0] for c in calls]
    shape, stride, offset = dsts[0]
    if shape != whole[0] or any(s < 0 for s in stride):
        return None
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) if all(shape) else 0
    step = dsts[1][2] - offset if len(dsts) > 1 else extent
    if extent == 0 or step < extent:  # empty or overlapping slices: one by one
        return None
    if any(d != (shape, stride, offset + i * step) for i, d in enumerate(dsts)):
        return None
    return (len(dsts), *shape), (step, *stride), offset
