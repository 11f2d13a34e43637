"""`Reload`: one sync through rlsync's capture/restore backend.

`begin()` checks the model against its capture, then swaps every reloadable
layer to load format (see `rlsync.reload.layer`); `load(group)` runs vLLM's
`model.load_weights` on the group, whose loaders now fill, process and copy
back each layer the moment it is complete; `commit()` checks that every layer
was complete, restores loaders and re-derives tied followers; `abort()` puts
every layer back on its kernel tensors. A `begin()` that fails part-way aborts
itself, so no layer is left on the meta device.

Which layers take part:
- a module with captured parameters is swapped (`SwappedLayer`), unless
- its quant method sets `rlsync_arrival = True` (`ArrivalLayer`: counted only),
- it passes through processing (kernel format == load format; `InPlaceLayer`:
  loaded straight into its kernel tensors, no load-format copy), unless its
  processing repacks CPU experts (`vllm_layers.repacks_experts`: swapped, so
  the repack writes the kernel tensors instead of a copy that is then copied back),
- it is a tied follower (an LM head sharing the embedding): it keeps the shared
  kernel tensor, which the owner's reload updates, and is re-processed at commit,
- it is a deferred attention layer: these hold no checkpoint parameters in the
  supported configs; one that does is refused (ConfigError) before any change.
Modules with buffers only (rotary caches, attention scales) are left alone.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from torch import nn

from rlsync.adapters import vllm_engine, vllm_layers
from rlsync.errors import ConfigError, NonFiniteError, SyncError
from rlsync.quant.finite import is_finite
from rlsync.reload.backend import ReloadBackend, Weights
from rlsync.reload.capture import (
    LayerCapture,
    ModelCapture,
    get_capture,
    layer_tensors,
    plain_tensor_attrs,
    record_kernel_format,
)
from rlsync.reload.layer import ArrivalLayer, InPlaceLayer, LiveBytes, LoaderPatches, SwappedLayer
from rlsync.reload.plan import PlannedCall, Recorder, SyncPlan, meta_of
from rlsync.reload.recording import Slot
from rlsync.reload.stacked import StackedCall, derive
from rlsync.reload.support import check_supported
from rlsync.source.stacked import Stack, segments


Planned = tuple[list[tuple[PlannedCall, ...] | None], dict[int, tuple[Stack, StackedCall]]]
"""A planned group: each item's calls (None inside a stack replayed as one call), and those stacks by start."""


def is_arrival_layer(layer: nn.Module) -> bool:
    """The layer's quant method quantizes each incoming shard straight into kernel storage."""
    return getattr(type(getattr(layer, "quant_method", None)), "rlsync_arrival", False) is True


class Reload(ReloadBackend):
    """rlsync's reload backend: layer-by-layer restore, load, process, copy into kernel storage."""

    name = "rlsync"

    def __init__(self, model: nn.Module, model_config: Any | None = None, *, plan: bool = False) -> None:
        super().__init__()
        self.plan: SyncPlan | None = SyncPlan() if plan else None
        """Recorded loader calls replayed on later syncs (`rlsync.reload.plan`); None: every group through vLLM."""
        self.plan_note = ""
        """Why the last sync (partly) recorded instead of replaying, for the report and the log."""
        self.planned: bool | None = None
        """Whether every group of the current / last sync was replayed from the plan (None: plans off)."""
        self.slot = Slot()
        self.by_name: dict[str, SwappedLayer | ArrivalLayer] = {}
        self.model = model
        self.capture: ModelCapture = get_capture(model)
        quantization = model_config.quantization if model_config is not None else self.capture.quantization
        check_supported(quantization)
        self.live = LiveBytes()
        self.layers: list[SwappedLayer | ArrivalLayer] = []
        """One per layer taking part (an `InPlaceLayer` is a `SwappedLayer`)."""
        self.patches = LoaderPatches()
        self.loaded_names: set[str] = set()
        """Engine parameter names `model.load_weights` reported in this session."""
        self.open = False
        self._layers: list[tuple[str, Any, str]] | None = None
        self._layers_key: list[tuple[nn.Module, Any]] = []
        self._unused_handles: set[int] = set()
        """ids of embeddings whose GEMM handle vLLM's forward never calls (`vllm_layers.unused_vocabulary_handles`)."""
        self._looked_up: tuple[Weights, list[tuple[PlannedCall, ...]] | None] | None = None

    # ---------------------------------------------------------- queries
    @property
    def live_bytes(self) -> int:
        """Load-format bytes alive right now."""
        return self.live.live

    def layer_load_bytes(self) -> dict[str, int]:
        """Load-format bytes of each layer this backend materializes during a reload.

        In-place and arrival layers materialize nothing and are not listed.
        """
        return {name: spec.load_bytes for name, spec, kind in self._plan() if kind == "swap"}

    def _plan(self) -> list[tuple[str, Any, str]]:
        """(module name, capture, "swap" | "in_place" | "arrival") for every layer that takes part.

        Computed once per model structure (two walks over every module cost about 7 ms of a 160 ms FP8 sync):
        kept while the model has the same modules, each with the same quant method, as when it was computed."""
        key = [(m, getattr(m, "quant_method", None)) for m in self.model.modules()]  # the objects: no reused ids
        if self._layers is not None and len(key) == len(self._layers_key) and all(
                a is c and b is d for (a, b), (c, d) in zip(key, self._layers_key, strict=True)):
            return self._layers
        self._layers, self._layers_key = self._compute_plan(), key
        self._unused_handles = vllm_layers.unused_vocabulary_handles(self.model)
        return self._layers

    def _compute_plan(self) -> list[tuple[str, Any, str]]:
        if not self.open and any(spec.kernel is None for spec in self.capture.layers.values()):
            record_kernel_format(self.model)  # first reload: the model is as processing left it
        followers = {id(m) for m in vllm_layers.tied_followers(self.model)}
        plan = []
        for name, layer in self.model.named_modules():
            spec = self.capture.layers.get(name)
            if spec is None or not spec.params or id(layer) in followers:
                continue
            if vllm_layers.is_deferred_attention_layer(layer):
                raise ConfigError(
                    f"{name}: attention layers with checkpoint parameters (e.g. KV-cache scales) are not "
                    "supported by reload_backend='rlsync'; use reload_backend='vllm'"
                )
            in_place = spec.passes_through and not vllm_layers.repacks_experts(layer)
            kind = "arrival" if is_arrival_layer(layer) else "in_place" if in_place else "swap"
            plan.append((name, spec, kind))
        return plan

    # ---------------------------------------------------------- session
    def begin(self) -> None:
        if self.open:
            raise SyncError("a reload session is already open on this model")
        plan = self._plan()
        modules = dict(self.model.named_modules())
        for name, spec, _ in plan:
            _check_kernel_format(name, modules[name], spec)
        self.live = LiveBytes()
        self.peak_live_bytes = 0
        self.loaded_names = set()
        self.layers = []
        self.by_name = {}
        self._check_plan(plan, modules)
        self.open = True
        try:
            for name, spec, kind in plan:
                if kind == "swap":
                    session = SwappedLayer(name, modules[name], spec, self.live, self.patches, self.slot)
                elif kind == "in_place":
                    session = InPlaceLayer(name, modules[name], spec, self.live, self.patches, self.slot)
                    session.lazy_handle = id(modules[name]) in self._unused_handles
                else:
                    session = ArrivalLayer(name, modules[name], spec, self.patches, self.slot)
                self.by_name[name] = session
                self.layers.append(session)  # before swapping: a layer that fails half-way is restored too
                session.swap_out()
        except BaseException:
            self.abort()  # every layer swapped so far back on its kernel tensors, loaders restored
            raise

    def _check_plan(self, plan: list[tuple[str, Any, str]], modules: dict[str, nn.Module]) -> None:
        """Drop the plan unless every taking-part layer still has the kernel tensors it was recorded with."""
        self.planned = None if self.plan is None else True
        self.plan_note = ""
        if self.plan is None:
            return
        fingerprint = tuple(
            (name, kind, tuple((n, t.data_ptr(), tuple(t.shape), t.dtype) for n, t in layer_tensors(modules[name])[0].items()))
            for name, _, kind in plan
        )
        if fingerprint != self.plan.fingerprint:
            if self.plan.entries:
                self.plan_note = "engine parameters changed since the plan was recorded (rebuilt or re-allocated)"
            self.plan.clear()
            self.plan.fingerprint = fingerprint

    def copy_checked(self, group: Weights, among: Collection[str] | None = None) -> set[str]:
        """Names (of `among`, default all) whose replayed calls are each one copy of the whole incoming tensor into
        a swapped layer's tensor (one by one or as a stack): `SwappedLayer.replay_batch` / `replay_stack` check
        those for NaN / Inf while copying (`rlsync.quant.finite.copy_finite`)."""
        found = self._lookup(group)
        if found is None:
            return set()
        calls, stacks = found
        out = {name for (name, tensor), planned in zip(group, calls, strict=True)
               if planned and (among is None or name in among) and all(self._copies_whole(call, tensor) for call in planned)}
        for stack, sc in stacks.values():
            if isinstance(self.by_name[sc.layer], SwappedLayer):
                out.update(n for n in stack.names if among is None or n in among)
        return out

    def _copies_whole(self, call: PlannedCall, tensor: Any) -> bool:
        return (call.copies is not None and len(call.copies) == 1 and isinstance(self.by_name.get(call.layer), SwappedLayer)
                and call.copies[0][1] == (tuple(tensor.shape), tensor.stride(), 0))

    def _lookup(self, group: Weights) -> Planned | None:
        """The plan's calls for `group` (None: record it); kept for the `load` of the same group object."""
        if self.plan is None or not isinstance(group, Sequence):
            return None
        if self._looked_up is not None and self._looked_up[0] is group:
            return self._looked_up[1]
        found = self._planned(group)
        self._looked_up = (group, found)
        return found

    def _planned(self, group: Weights) -> Planned | None:
        """Every item's calls (None for the items of a stack replayed as one call: those by stack start)."""
        assert self.plan is not None
        calls: list[tuple[PlannedCall, ...] | None] = []
        stacks: dict[int, tuple[Stack, StackedCall]] = {}
        for pairs, stack in segments(group):
            per = self.plan.lookup(pairs) if stack is None else self._planned_stack(stack, pairs)
            if per is None:
                return None
            if stack is not None and isinstance(per, StackedCall):
                stacks[stack.start] = (stack, per)
                per = [None] * len(pairs)
            calls += per
        return calls, stacks

    def _planned_stack(self, stack: Stack, pairs: Weights) -> StackedCall | list[tuple[PlannedCall, ...]] | None:
        """The stack as one call, else its slices' calls (None: record the group)."""
        assert self.plan is not None
        meta = meta_of(stack.tensor)
        known = self.plan.stacked.get(stack.names)
        if known is None or known[0] != meta:
            per = self.plan.lookup(pairs)  # every slice recorded, same metadata
            if per is None:
                return None
            derived = derive(per, stack.tensor)
            layer = self.by_name.get(derived.layer) if derived is not None else None
            known = self.plan.stacked[stack.names] = (meta, derived if layer and layer.takes_stack(derived) else None, per)
        return known[2] if known[1] is None else known[1]

    def load(self, group: Weights, check: Collection[str] = frozenset()) -> None:
        if not self.open:
            raise SyncError("load() outside a reload session: call begin() first")
        try:
            found = self._lookup(group)
            self._looked_up = None
            if found is None and check:  # no copy to fold the check into: one pass before loading
                bad = next((name for name, tensor in group if name in check and not is_finite(tensor)), None)
                if bad is not None:
                    raise NonFiniteError(bad)
            if self.plan is None or not isinstance(group, Sequence):
                self.loaded_names |= vllm_engine.load_weights(self.model, group)
            elif found is None:
                self._record(group)
            else:
                self._replay(group, found, check)
        finally:
            self.peak_live_bytes = self.live.peak

    def _record(self, group: Weights) -> None:
        """vLLM's `load_weights`, with every loader call attributed to its incoming tensor and stored."""
        assert self.plan is not None
        self.planned = False
        if not self.plan_note:
            self.plan_note = f"recorded: {group[0][0] if group else 'an empty group'} was not planned yet"
        recorder = self.slot.recorder = Recorder(group)
        try:
            with recorder.watching():
                self.loaded_names |= vllm_engine.load_weights(self.model, recorder.feed())
        finally:
            self.slot.recorder = None
        self.plan.store(recorder)
        if recorder.deferred:
            self._run_deferred(group, recorder)

    def _run_deferred(self, group: Weights, recorder: Recorder) -> None:
        """The arrival loader calls the recording deferred (`recording.Deferred`), made now: replayed from the plan
        just stored (a stack of experts as one call), or call by call where the group is not plannable."""
        deferred = recorder.deferred
        found = None if recorder.spoiled or any(d.call is None for d in deferred) else self._planned(group)
        if found is None:
            for d in deferred:
                d.layer.run_deferred(d)
            return
        ids = {id(d.call) for d in deferred}
        calls, stacks = found
        keep = [None if planned is None else tuple(c for c in planned if id(c) in ids) for planned in calls]
        for start, (stack, sc) in list(stacks.items()):
            if not all(id(c) in ids for c in sc.calls):  # not this loader's alone: its deferred slices one by one
                del stacks[start]
                keep[start:start + len(stack.names)] = [tuple(c for c in per if id(c) in ids)
                                                        for per in self.plan.stacked[stack.names][2]]
        self._replay(group, (keep, stacks))

    def _replay(self, group: Weights, found: Planned, check: Collection[str] = ()) -> None:
        """Each planned call in arrival order; consecutive calls for one batchable parameter together.
        `check`: names to find free of NaN / Inf (`copy_checked`), checked by their copies."""
        calls, stacks = found
        batch: list[tuple[PlannedCall, Any, str | None]] = []

        def flush() -> None:
            if batch:
                self.by_name[batch[0][0].layer].replay_batch([c for c, _, _ in batch], [t for _, t, _ in batch],
                                                             [n for _, _, n in batch])
                batch.clear()

        for index, ((name, tensor), planned) in enumerate(zip(group, calls, strict=True)):
            if planned is None:  # a stack's slice: the stack is one call, at its first slice
                if index in stacks:
                    flush()
                    stack, sc = stacks[index]
                    self.loaded_names.add(f"{sc.layer}.{sc.pname}")
                    self.by_name[sc.layer].replay_stack(sc, stack.names, stack.tensor, check)
                continue
            checked = name if name in check else None
            for call in planned:
                layer = self.by_name.get(call.layer)
                if layer is None:
                    raise SyncError(f"sync plan names layer {call.layer!r}, which takes no part in this sync")
                self.loaded_names.add(f"{call.layer}.{call.pname}")
                if layer.batchable(call):
                    if batch and (batch[0][0].layer, batch[0][0].pname) != (call.layer, call.pname):
                        flush()
                    batch.append((call, tensor, checked))
                    continue
                flush()
                if checked is not None and not is_finite(tensor):  # not a copy after all: one pass first
                    raise NonFiniteError(checked)
                layer.replay(call, tensor)
        flush()

    def commit(self) -> None:
        if not self.open:
            raise SyncError("commit() outside a reload session")
        missing = [line for session in self.layers for line in session.missing()]
        if missing:
            raise SyncError(
                f"reload incomplete: {len(missing)} tensors not fully loaded, e.g. " + "; ".join(missing[:5])
            )
        self.patches.restore()
        self.layers = []
        self.open = False
        self._looked_up = None
        self.peak_live_bytes = self.live.peak
        vllm_layers.refresh_tied_followers(self.model)

    def abort(self) -> None:
        self._looked_up = None  # no group outlives its sync
        if self.plan is not None:
            self.plan.clear()  # a failed sync records again: never replay decisions made around a failure
        for session in self.layers:
            session.restore()
        self.patches.restore()
        self.layers = []
        self.open = False
        self.peak_live_bytes = self.live.peak


def _check_kernel_format(name: str, layer: nn.Module, spec: LayerCapture) -> None:
    """The layer still holds the kernel tensors processing produced at load (or the first reload):
    its parameters and the plain tensor attributes under load-format parameter names."""
    assert spec.kernel is not None
    tensors = layer_tensors(layer)[0] | plain_tensor_attrs(layer, spec.params)
    current = {n: (tuple(p.shape), tuple(p.stride()), p.dtype, type(p)) for n, p in tensors.items()}
    recorded = {n: (k.shape, k.stride, k.dtype, k.cls) for n, k in spec.kernel.items() if not k.is_buffer}
    if current != recorded:
        raise SyncError(
            f"{name}: parameters {current} differ from the kernel format recorded after load {recorded}; "
            "was the model modified outside rlsync (or its weights discarded by sleep level 2)?"
        )
