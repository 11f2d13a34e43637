"""Sync plans: record where each checkpoint tensor's bytes land on one sync, replay that on the next.

Why: every step feeds the same names, shapes and dtypes into the same engine,
and vLLM's `load_weights` makes the same decisions every time: which module a
name maps to, which loader, which shard id and expert id, which rows. That
machinery costs per tensor, not per byte. On a Qwen3-MoE layer of 256 experts
(768 checkpoint tensors) it was most of a sync (benchmarks/README.md, MoE
section). A plan makes it once.

Recording (a group the plan does not cover goes through vLLM's `load_weights`
as before): each loader call the reload backend's layer sessions see is
attributed to the incoming tensor its `loaded_weight` is a view of (same
dtype and device, inside its bytes: `place`) and stored as a `PlannedCall`: the layer, the
parameter, the shard key, the loader's other arguments, the numel counted and
the view of the incoming tensor it received. Where the loader only copied
views of that tensor into views of the parameter (checked on its dispatch
trace: every mutating op a `copy_`, every source inside the incoming tensor,
every destination inside the parameter), the copies' geometry is stored too.
A loader that quantizes on arrival and says what its calls return
(`rlsync_deferred`: rlsync's FP8 linears and experts) is not called while vLLM loads:
its calls are recorded, then made from the stored plan as a replay makes
them (a stack of experts as one call; `rlsync.reload.recording.Deferred`).

Replay (a group whose every name is planned with the same shape, stride and
dtype): per tensor, one dictionary lookup, then either the recorded copies
(`as_strided` on both sides, `copy_`) or one direct call of the loader with
the recorded arguments. No name mapping, no loader dispatch, no signature
binding, no counting mode. The layer sessions still count, refuse a second
load and finish each layer when complete, exactly as on the recording path,
so commit's completeness check and fail-closed behaviour are unchanged.

What makes a group unplannable (recorded as such, so it keeps going through
vLLM, and the sync reports `planned=False`): a loader call whose
`loaded_weight` is no view of any incoming tensor (vLLM computed it), a loader
argument that is a tensor, or a mutation outside any loader call.

Invalidation: the plan is keyed by `fingerprint` (every participating layer's
name, kind and its kernel tensors' identity, shape and dtype). A different
fingerprint at `begin` (engine rebuilt, sleep level 2 re-allocated the
weights, another quant config) drops the whole plan; a tensor with another
shape, stride or dtype than recorded sends its group down the recording path;
an aborted sync drops the plan. A replay therefore never writes with stale
decisions; at worst it records again.

Assumption (stated, tested on every family of the family matrix and MoE,
both arrival orders): a loader's effect is what its tensor ops do. A vLLM
loader that kept Python state between calls would be replayed by calling it
again (not by copies) only if it also wrote outside the parameter.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

Geometry = tuple[tuple[int, ...], tuple[int, ...], int]
"""(size, stride, storage offset relative to a base tensor's own offset)."""

PARAM, LOADED = object(), object()
"""Placeholders for `param` and `loaded_weight` in a recorded argument list."""


def span(t: torch.Tensor) -> tuple[int, int]:
    """First and one-past-last storage element `t` touches."""
    if t.is_contiguous():
        return t.storage_offset(), t.storage_offset() + t.numel()
    lo = hi = t.storage_offset()
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if size == 0:
            return lo, lo
        if stride >= 0:
            hi += (size - 1) * stride
        else:
            lo += (size - 1) * stride
    return lo, hi + 1


def place(t: torch.Tensor) -> tuple | None:
    """Where `t`'s elements lie: (dtype, device, first byte's address, one past the last byte's); None on meta.

    Addresses, not (storage, element offsets): `data_ptr` is one C call where `untyped_storage()` builds a
    Python object, and a recorded 256-expert layer asks thousands of times. Two live allocations never share an
    address, so lying within another tensor's bytes means lying within its storage (or within memory another
    storage object maps onto the same bytes, which a replay then writes just the same)."""
    if t.is_meta:
        return None
    ptr, size = t.data_ptr(), t.element_size()
    if t.is_contiguous():
        return t.dtype, t.device, ptr, ptr + t.numel() * size
    lo, hi = span(t)
    offset = t.storage_offset()
    return t.dtype, t.device, ptr + (lo - offset) * size, ptr + (hi - offset) * size


def _inside(p: tuple | None, q: tuple | None) -> bool:
    """Place `p` lies within place `q` (same dtype and device)."""
    return p is not None and q is not None and p[0] == q[0] and p[1] == q[1] and q[2] <= p[2] and p[3] <= q[3]


def _geometry_in(view: torch.Tensor, base: torch.Tensor) -> Geometry | None:
    """`view`'s geometry inside `base` (of its dtype), or None when its first element is not on an element of
    `base`'s (only memory that two storage objects map at an odd distance)."""
    offset, rest = divmod(view.data_ptr() - base.data_ptr(), view.element_size())
    return None if rest else (tuple(view.shape), view.stride(), offset)


def geometry(view: torch.Tensor, base: torch.Tensor, where: tuple | None = None) -> Geometry | None:
    """`view` as (size, stride, offset) inside `base`'s elements, or None when it is not inside them.
    `where`: `place(base)`, when the caller keeps it (one base, many views)."""
    return _geometry_in(view, base) if _inside(place(view), place(base) if where is None else where) else None


def view_of(base: torch.Tensor, geom: Geometry) -> torch.Tensor:
    size, stride, offset = geom
    return base.as_strided(size, stride, base.storage_offset() + offset)


def meta_of(t: torch.Tensor) -> tuple:
    """What an incoming tensor must match for its planned calls to apply."""
    return tuple(t.shape), t.stride(), t.dtype, t.device


@dataclasses.dataclass(slots=True, eq=False)
class PlannedCall:
    """One loader call recorded for one incoming tensor; never changed once stored.

    Not a frozen dataclass: a frozen one's constructor sets each field through `object.__setattr__`, 2 us a
    call against 0.6, and a recorded 256-expert layer makes 768 of them. Compared by identity (`eq=False`):
    a plan tells its calls apart by `id`, and two equal calls are still two calls."""

    layer: str
    """Module name of the layer session that received it."""
    pname: str
    """The layer's parameter."""
    key: tuple
    """Shard key (`loaded_shard_id`, expert id, ...), for the loaded-twice check."""
    numel: int
    """Load-format elements the call counted."""
    loaded: Geometry
    """The `loaded_weight` the loader received, as a view of the incoming tensor."""
    args: tuple
    """Positional arguments, `PARAM` / `LOADED` where those go."""
    kwargs: dict[str, Any]
    """Keyword arguments, same placeholders."""
    named: dict[str, Any]
    """The loader's other (non-tensor) arguments by parameter name, for a loader's `rlsync_batch`."""
    copies: tuple[tuple[Geometry, Geometry], ...] | None
    """(destination in the parameter, source in the incoming tensor) per `copy_`; None: call the loader."""
    whole: bool = False
    """`loaded` is the incoming tensor itself (its own size and stride, offset 0): replay hands over the tensor,
    no `as_strided` view (a replay's incoming tensor has the recorded shape and stride, `SyncPlan.lookup`)."""

    def call(self, loader: Callable, param: torch.Tensor, tensor: torch.Tensor) -> Any:
        loaded = self.loaded_view(tensor)
        sub = lambda v: param if v is PARAM else loaded if v is LOADED else v  # noqa: E731
        return loader(*(sub(a) for a in self.args), **{k: sub(v) for k, v in self.kwargs.items()})

    def loaded_view(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.whole else view_of(tensor, self.loaded)

    def write(self, param: torch.Tensor, tensor: torch.Tensor) -> None:
        assert self.copies is not None
        with torch.no_grad():
            for dst, src in self.copies:
                view_of(param, dst).copy_(view_of(tensor, src))


def template(values: Sequence[Any], param: torch.Tensor, loaded: torch.Tensor) -> tuple | None:
    """`values` with `PARAM` / `LOADED` for those two tensors, or None when another value is a tensor."""
    out = []
    for v in values:
        if v is param:
            out.append(PARAM)
        elif v is loaded:
            out.append(LOADED)
        elif isinstance(v, torch.Tensor):
            return None
        else:
            out.append(v)
    return tuple(out)


class _Mode(TorchDispatchMode):
    """rlsync's dispatch modes, without the Dynamo-disabling wrapper torch puts around `__torch_dispatch__`.

    That wrapper was about 5 us of the 7-10 us each op costs under a mode (a 256-expert layer's loaders run
    ~15 ops per checkpoint tensor). These modes only forward ops and look at their arguments; they never run
    compiled code inside `__torch_dispatch__`, which is what the wrapper guards against.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False


def writes_nothing(func, args, kwargs=None) -> bool:
    """Every tensor `func` may write (its schema's written arguments) is empty, so the op has no effect.

    vLLM's vocabulary loader zero-fills the padding rows past the checkpoint's vocabulary, which are often
    none: that call is still one plain copy (replayed as a copy; the plan is keyed on the shapes)."""
    written = [(i, a.name) for i, a in enumerate(func._schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
    values = [args[i] if i < len(args) else (kwargs or {}).get(name) for i, name in written]
    return bool(values) and all(isinstance(v, torch.Tensor) and v.numel() == 0 for v in values)


class LoaderTrace(_Mode):
    """Counts the elements a loader call writes with `copy_`, and whether those copies alone are its effect.

    `copies` stays a list of (destination, source) geometries while every
    mutating op is a `copy_` from inside `source` into `param`; anything else
    sets it to None (the call is then replayed by calling the loader).
    Entered as a mode when not recording; while recording, the group's one
    `_Watch` mode hands it the loader call's ops instead (`Recorder.loader_call`).
    """

    def __init__(self, param: torch.Tensor | None = None, source: torch.Tensor | None = None) -> None:
        super().__init__()
        self.numel = 0
        self.param, self.source = param, source
        self.copies: list[tuple[Geometry, Geometry]] | None = [] if param is not None and source is not None else None
        self._places: tuple[tuple | None, tuple | None] | None = None
        """`place` of `param` and `source`, taken at the first copy (a recorded MoE group has one per expert)."""

    def see(self, func, args, kwargs=None) -> None:
        if func is torch.ops.aten.copy_.default:
            self.numel += args[0].numel()
            if self.copies is not None:
                if self._places is None:
                    self._places = place(self.param), place(self.source)
                dst, src = geometry(args[0], self.param, self._places[0]), geometry(args[1], self.source, self._places[1])
                if dst is None or src is None:
                    self.copies = None
                else:
                    self.copies.append((dst, src))
        elif func._schema.is_mutable and not writes_nothing(func, args, kwargs):
            self.copies = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.see(func, args, kwargs)
        return func(*args, **(kwargs or {}))


class _Watch(_Mode):
    """The one mode over a recorded group's `load_weights`: inside a loader call it hands ops to the call's trace;
    outside every loader call any mutation makes the group unplannable.

    One mode for the whole group (instead of a watch that each loader call disabled and a trace each call
    entered) saves two mode switches per checkpoint tensor. rlsync's own work inside a loader call
    (materializing, counting; processing runs with no mode at all) is not vLLM's and does not spoil.
    """

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        rec = self.recorder
        if rec.trace is not None:
            rec.trace.see(func, args, kwargs)
        elif not rec.inside and func._schema.is_mutable:
            rec.spoil(f"{func} outside a weight loader")
        return func(*args, **(kwargs or {}))


class _Inside:
    """`with recorder.loader_call(trace)`: the ops until exit are one loader call's (`trace`: vLLM's loader)."""

    __slots__ = ("recorder", "trace", "saved")

    def __init__(self, recorder: Recorder, trace: LoaderTrace | None) -> None:
        self.recorder, self.trace = recorder, trace

    def __enter__(self) -> None:
        rec = self.recorder
        self.saved = (rec.inside, rec.trace)
        rec.inside, rec.trace = True, self.trace

    def __exit__(self, *exc) -> None:
        self.recorder.inside, self.recorder.trace = self.saved


class Recorder:
    """Attributes one group's loader calls to its incoming tensors while vLLM loads it."""

    def __init__(self, group: Sequence[tuple[str, torch.Tensor]]) -> None:
        self.group = group
        self.calls: dict[str, list[PlannedCall]] = {name: [] for name, _ in group}
        self.current: int = -1
        self.spoiled: str | None = None
        self.inside = False
        """In a loader call (rlsync's wrapper or the loader itself): not vLLM's `load_weights` code."""
        self.trace: LoaderTrace | None = None
        """The trace of the loader running right now, fed by the `_Watch` mode."""
        self._where: dict[int, tuple] = {}
        """Item index -> `place` of its tensor, for `source_of`."""
        self.deferred: list = []
        """Arrival loader calls to make once vLLM's `load_weights` returned (`rlsync.reload.recording.Deferred`)."""

    def spoil(self, why: str) -> None:
        if self.spoiled is None:
            self.spoiled = why

    def feed(self):
        """The group as vLLM's iterator, tracking which tensor vLLM is on."""
        for i, item in enumerate(self.group):
            self.current = i
            yield item

    def watching(self) -> _Watch:
        return _Watch(self)

    def loader_call(self, trace: LoaderTrace | None = None) -> _Inside:
        return _Inside(self, trace)

    def source_of(self, loaded: torch.Tensor) -> tuple[str, torch.Tensor, Geometry] | None:
        """The incoming (name, tensor) `loaded` is a view of, and `loaded`'s geometry inside it: the current
        one first, then the rest. Same test as `geometry`, with each incoming tensor's place computed once
        (a recorded 256-expert layer asks 768 times)."""
        here = place(loaded)
        if here is None:
            return None
        count = len(self.group)
        for i in itertools.chain((self.current,) if 0 <= self.current < count else (), range(count)):
            where = self._where.get(i)
            if where is None:
                where = self._where[i] = place(self.group[i][1])
            if _inside(here, where):
                name, t = self.group[i]
                geom = _geometry_in(loaded, t)
                return None if geom is None else (name, t, geom)
        return None

    def add(self, name: str, call: PlannedCall) -> None:
        self.calls[name].append(call)

    def defer(self, item: Any) -> None:
        self.deferred.append(item)


@dataclasses.dataclass(slots=True)
class SyncPlan:
    """Recorded calls per checkpoint name, valid for one engine state (`fingerprint`)."""

    fingerprint: tuple = ()
    entries: dict[str, tuple[tuple, tuple[PlannedCall, ...] | None]] = dataclasses.field(default_factory=dict)
    """name -> (incoming tensor's `meta_of`, its calls; None: unplannable, always through vLLM)."""
    stacked: dict[tuple[str, ...], tuple[tuple, Any, list]] = dataclasses.field(default_factory=dict)
    """A stack's names -> (its tensor's `meta_of`, its `stacked.StackedCall` or None: slice by slice, the slices'
    calls), derived from `entries` (`Reload._planned`); dropped whenever an entry of the stack changes."""

    def lookup(self, group: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[PlannedCall, ...]] | None:
        """Every tensor's calls when the whole group is planned with matching metadata, else None."""
        out = []
        for name, tensor in group:
            entry = self.entries.get(name)
            if entry is None or entry[1] is None or entry[0] != meta_of(tensor):
                return None
            out.append(entry[1])
        return out

    def store(self, recorder: Recorder) -> None:
        names = {name for name, _ in recorder.group}
        for key in [k for k in self.stacked if not names.isdisjoint(k)]:  # derived from entries replaced now
            del self.stacked[key]
        for name, tensor in recorder.group:
            calls = None if recorder.spoiled else tuple(recorder.calls[name])
            self.entries[name] = (meta_of(tensor), calls)

    def clear(self) -> None:
        self.entries.clear()
        self.stacked.clear()
        self.fingerprint = ()
