"""One layer's part in a reload: swap to load format, fill, process, copy back.

`SwappedLayer` handles a layer whose processing must run again: `swap_out()`
replaces its parameters by load-format tensors on the meta device (keeping the
kernel tensors aside); the first shard for a tensor materializes it; the
original weight loader writes the shard; once the layer has received its
load-format element count it is processed, the results are copied into the
kernel tensors' storage, the kernel tensors go back on the layer and the
load-format temporaries are dropped.

`InPlaceLayer` handles a layer that passes through processing (load format
== kernel format: embeddings, LM heads, norms): nothing is swapped or
materialized; the original loaders write straight into the kernel tensors
(zero live load-format bytes), elements are counted the same way, and once
complete the layer is processed again so state derived from the weights (on
CPU the oneDNN handle) is rebuilt from the new values.

`ArrivalLayer` handles a layer whose quant method quantizes on arrival
(`rlsync_arrival = True`): it keeps its kernel tensors and only counts.

Both guard the layer once it is complete: a further load raises instead of
silently overwriting kernel storage. Every loader attribute they change is
restored by `LoaderPatches.restore()`.

Kernel tensors that processing left as plain attributes under a load-format
parameter's name (`del layer.weight; layer.weight = t`, recorded as
`KernelSpec.is_attr`) are moved aside like kernel parameters, filled the same
way (copy into their storage) and set back as plain attributes. Uninitialized
(lazy) tensors are not captured and never leave the layer.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from rlsync.adapters import vllm_layers, vllm_load, vllm_tp
from rlsync.errors import NonFiniteError, SyncError
from rlsync.quant.finite import copy_finite, is_finite
from rlsync.quant.layout import stacked_view
from rlsync.reload.binding import Binder, Bound, binder_for, shard_key
from rlsync.reload.capture import LayerCapture, TensorSpec, layer_tensors, plain_tensor_attrs
from rlsync.reload.plan import LoaderTrace, PlannedCall, Recorder, span, view_of
from rlsync.reload.recording import Deferred, Slot, loading, record_call
from rlsync.reload.stacked import StackedCall

class LiveBytes:
    """Load-format bytes alive right now and the most alive at once."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def add(self, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def release(self, nbytes: int) -> None:
        self.live -= nbytes


_MISSING = object()


class LoaderPatches:
    """`weight_loader` attributes replaced for one session, and how to put them back."""

    def __init__(self) -> None:
        self._saved: list[tuple[torch.Tensor, Any]] = []

    def set(self, tensor: torch.Tensor, loader: Callable) -> None:
        self._saved.append((tensor, getattr(tensor, "weight_loader", _MISSING)))
        tensor.weight_loader = loader

    def restore(self) -> None:
        for tensor, old in reversed(self._saved):
            if old is _MISSING:
                del tensor.weight_loader
            else:
                tensor.weight_loader = old
        self._saved.clear()


def _refuse_nonfinite_slice(names: tuple[str, ...], tensor: torch.Tensor, check: Collection[str]) -> None:
    """`NonFiniteError` naming the first slice of a stack (`names[i]` is `tensor[i]`) that must be checked and holds
    NaN or Inf; only after the stack as a whole failed its check: one pass per slice."""
    bad = next((n for n, t in zip(names, tensor.unbind(0), strict=True) if n in check and not is_finite(t)), None)
    if bad is not None:
        raise NonFiniteError(bad)


def _disjoint(views: list[torch.Tensor]) -> bool:
    """No two views touch the same storage elements (checked on their spans, which is stricter)."""
    spans = sorted(span(v) for v in views)
    return all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


def _loader_of(spec_or_tensor: TensorSpec | torch.Tensor, layer: nn.Module) -> Callable:
    """The loader a tensor's writes go through (vLLM's default where it sets none, resolved on use)."""
    if isinstance(spec_or_tensor, TensorSpec):
        loader = spec_or_tensor.weight_loader(layer)
    else:
        loader = vllm_load.original_weight_loader(getattr(spec_or_tensor, "weight_loader", None))
    return loader if loader is not None else _default_loader


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """`a` is `b`'s elements under another tensor object (processing wrote into the kernel tensor and holds an
    alias of it: `vllm_layers.expert_prepack_into`)."""
    return (not a.is_meta and a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def _default_loader(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    vllm_load.default_weight_loader()(param, loaded_weight)


class SwappedLayer:
    """A layer reloaded through its load format (see module docstring)."""

    def __init__(self, name: str, layer: nn.Module, spec: LayerCapture, live: LiveBytes, patches: LoaderPatches,
                 slot: Slot | None = None) -> None:
        self.name, self.layer, self.spec, self.live, self.patches = name, layer, spec, live, patches
        self.slot = slot or Slot()
        self.originals: dict[str, Callable] = {}
        """The loader underneath each parameter's counting wrapper (a planned call is replayed through it)."""
        self.kernel_params, self.kernel_buffers = layer_tensors(layer)
        self.kernel_attrs = plain_tensor_attrs(layer, spec.params)
        """Kernel tensors processing left as plain attributes under a parameter's name."""
        self.non_persistent = set(layer._non_persistent_buffers_set)
        self.loaders: dict[str, Callable] = {}
        self.loaded = {n: 0 for n in spec.params}
        self.total = spec.load_numel
        self.count = 0
        self.shards: set[tuple] = set()
        self.materialized: dict[str, torch.Tensor] = {}
        self.done = False
        self.lazy_handle = False
        """Its GEMM handle is never called by vLLM's forward: built on first use (`vllm_layers.LazyHandle`)."""

    # ------------------------------------------------------------ begin
    def swap_out(self) -> None:
        """Kernel parameters and plain kernel attributes aside; load-format parameters on meta, counting loaders."""
        for n in self.kernel_params:
            del self.layer._parameters[n]
        for n in self.kernel_attrs:
            del self.layer.__dict__[n]
        for n, spec in self.spec.params.items():
            self.loaders[n] = self._make_loader(n)
            meta = spec.build(self.layer, "meta")
            meta.weight_loader = self.loaders[n]
            self.layer.register_parameter(n, meta)

    def _make_loader(self, pname: str) -> Callable:
        spec = self.spec.params[pname]
        original = self.originals[pname] = _loader_of(spec, self.layer)
        binder = binder_for(original)  # cached across syncs, per loader function

        def rlsync_reload_loader(*args: Any, **kwargs: Any) -> Any:
            rec = self.slot.recorder
            if rec is None:
                return self._load(pname, spec, original, binder, args, kwargs)
            with rec.loader_call():  # rlsync's own ops here are no mutation by vLLM's `load_weights`
                return self._load(pname, spec, original, binder, args, kwargs)

        return rlsync_reload_loader

    # ------------------------------------------------------------- load
    def _claim(self, key: tuple) -> None:
        if self.done:
            raise SyncError(f"{self.name}.{key[0]} loaded twice: the layer was already complete in this sync")
        if key in self.shards:
            raise SyncError(f"{self.name}.{key[0]} loaded twice (shard {dict(key[1]) or 'whole tensor'})")
        self.shards.add(key)

    def _count(self, pname: str, numel: int) -> None:
        self.loaded[pname] += numel
        self.count += numel
        if self.count >= self.total:
            self.finish()

    def _load(self, pname: str, spec: TensorSpec, original: Callable, binder: Binder, args: tuple,
              kwargs: dict) -> Any:
        bound = binder.bind(args, kwargs)
        key = (pname, shard_key(bound))
        self._claim(key)
        param = bound.arguments["param"] = self._materialize(pname, spec)
        call_args, call_kwargs = bound.split()
        rec = self.slot.recorder
        if rec is None:
            with LoaderTrace(param) as trace:
                result = original(*call_args, **call_kwargs)
            self._count(pname, min(trace.numel, spec.load_numel))
            return result
        source = rec.source_of(bound.arguments["loaded_weight"])
        trace = LoaderTrace(param, source[1] if source else None)
        with rec.loader_call(trace):  # the recorder's watch hands the loader's ops to `trace`
            result = original(*call_args, **call_kwargs)
        numel = min(trace.numel, spec.load_numel)
        record_call(self.slot, self.name, pname, key, numel, bound, trace.copies, source)
        if self.count + numel < self.total:
            self._count(pname, numel)
        else:
            with _disable_current_modes():  # processing (maybe compiled) runs with no mode, as when not recording
                self._count(pname, numel)
        return result

    def batchable(self, call: PlannedCall) -> bool:
        """A planned call that is one copy: consecutive ones into this parameter may become one copy."""
        return call.copies is not None and len(call.copies) == 1

    def replay_batch(self, calls: list[PlannedCall], tensors: list[torch.Tensor],
                     check: list[str | None] | None = None) -> None:
        """Single-copy planned calls for one parameter, as few `copy_`s as the layout allows; same checks and
        counts as `replay`.

        The calls are split by shard (`*shard_id*` loader arguments: an expert layer's gate, up, down) and
        geometry; each part whose destinations and sources are evenly spaced views (an MoE layer's experts)
        becomes one copy. Writes leave arrival order only when no two destinations overlap.
        `check[i]`: the incoming name of `tensors[i]` when its copy must also find it free of NaN / Inf
        (`rlsync.quant.finite.copy_finite`; `NonFiniteError` once the batch is written), else None.
        """
        for call in calls:
            self._claim(call.key)
        pname = calls[0].pname
        param = self._materialize(pname, self.spec.params[pname])
        names = check if check is not None else [None] * len(calls)
        pairs = [(view_of(param, c.copies[0][0]), view_of(t, c.copies[0][1]), n)
                 for c, t, n in zip(calls, tensors, names, strict=True)]
        bad: list[str] = []
        with torch.no_grad():
            if _disjoint([d for d, _, _ in pairs]):
                parts: dict[tuple, list[tuple[torch.Tensor, torch.Tensor, str | None]]] = {}
                for call, (d, s, n) in zip(calls, pairs, strict=True):
                    shard = tuple((k, v) for k, v in call.named.items() if "shard" in k)
                    parts.setdefault((shard, d.shape, d.stride(), s.shape, s.stride()), []).append((d, s, n))
                pairs = []
                for part in parts.values():
                    dst, src = stacked_view([d for d, _, _ in part]), stacked_view([s for _, s, _ in part])
                    if dst is None or src is None:
                        pairs += part
                    elif any(n is not None for _, _, n in part):
                        if not copy_finite(dst, src):  # which one: only on failure, one pass each
                            bad += [n for _, s, n in part if n is not None and not is_finite(s)]
                    else:
                        dst.copy_(src)
            for d, s, n in pairs:
                if n is None:
                    d.copy_(s)
                elif not copy_finite(d, s):
                    bad.append(n)
        for call in calls:
            self._count(pname, call.numel)
        if bad:
            raise NonFiniteError(bad[0])

    def takes_stack(self, sc: StackedCall) -> bool:
        """`replay_stack` can replay it: its calls are one evenly spaced copy each."""
        return sc.dst is not None

    def replay_stack(self, sc: StackedCall, names: tuple[str, ...], tensor: torch.Tensor, check: Collection[str]) -> None:
        """A stack's calls as one copy into one view of the parameter; same claims and counts as `replay_batch`.
        `check`: names (of `names`, the slices' names) to find free of NaN / Inf, by the copy."""
        if self.done or not self.shards.isdisjoint(sc.keys):
            self._claim(next((k for k in sc.calls_keys() if k in self.shards), sc.calls[0].key))  # raises as one by one
        self.shards |= sc.keys
        param = self._materialize(sc.pname, self.spec.params[sc.pname])
        dst = view_of(param, sc.dst)
        ok = True
        with torch.no_grad():
            if any(n in check for n in names):
                ok = copy_finite(dst, tensor)
            else:
                dst.copy_(tensor)
        self._count(sc.pname, sc.numel)
        if not ok:
            _refuse_nonfinite_slice(names, tensor, check)

    def replay(self, call: PlannedCall, tensor: torch.Tensor) -> None:
        """One planned call: the recorded copies (or the loader, called directly), then the same counting."""
        self._claim(call.key)
        param = self._materialize(call.pname, self.spec.params[call.pname])
        if call.copies is not None:
            call.write(param, tensor)
        else:
            call.call(self.originals[call.pname], param, tensor)
        self._count(call.pname, call.numel)

    def _materialize(self, pname: str, spec: TensorSpec) -> torch.Tensor:
        tensor = self.materialized.get(pname)
        if tensor is None:
            tensor = spec.build(self.layer, spec.device)
            self.layer.register_parameter(pname, tensor)
            # a later `load_weights` call finds this tensor; its writes must be counted too
            tensor.weight_loader = self.loaders[pname]
            self.materialized[pname] = tensor
            self.live.add(spec.nbytes)
        return tensor

    # ----------------------------------------------------------- finish
    def finish(self) -> None:
        """Process the complete layer and copy the result into the kernel tensors' storage."""
        for pname, spec in self.spec.params.items():
            self._materialize(pname, spec)  # tensors with no checkpoint data (declared padding)
        vllm_layers.process_layer(self.layer, lazy_handle=self.lazy_handle, into=self.kernel_params)
        for n, kernel in (self.kernel_params | self.kernel_attrs).items():
            self._copy_into(n, kernel, self._processed(n))
        for n, kernel in self.kernel_buffers.items():
            current = self.layer._buffers.get(n)
            if current is not None and current is not kernel:
                self._copy_into(n, kernel, current)
        self._place_kernel_tensors()
        self.done = True
        for tensor in self.kernel_params.values():
            self.patches.set(tensor, self._closed_loader)

    def _processed(self, n: str) -> torch.Tensor | None:
        """What processing left under `n`: a parameter, or a plain tensor attribute."""
        param = self.layer._parameters.get(n)
        return param if param is not None else plain_tensor_attrs(self.layer, [n]).get(n)

    def _copy_into(self, n: str, kernel: torch.Tensor, new: torch.Tensor | None) -> None:
        if new is None:
            raise SyncError(f"{self.name}: processing did not recreate kernel tensor {n!r}")
        if new is kernel or _same_memory(new, kernel):
            return  # processed in place (an `InPlaceLayer`), or into the kernel storage itself: nothing to copy
        if new.shape != kernel.shape or new.dtype != kernel.dtype:
            raise SyncError(
                f"{self.name}.{n}: processing produced {tuple(new.shape)}/{new.dtype} but the kernel tensor is "
                f"{tuple(kernel.shape)}/{kernel.dtype}; the rlsync backend copies into the original storage "
                "and needs the same kernel format every time"
            )
        with torch.no_grad():
            kernel.data.copy_(new.data)

    def _place_kernel_tensors(self) -> None:
        params, buffers = layer_tensors(self.layer)  # lazy tensors never left the layer: they stay
        for n in params:
            del self.layer._parameters[n]
        for n in [n for n in buffers if n not in self.kernel_buffers]:
            del self.layer._buffers[n]  # created by processing this time, absent from the kernel format
        names = set(self.spec.params) | set(self.kernel_params) | set(self.kernel_attrs)
        for n in plain_tensor_attrs(self.layer, names):
            del self.layer.__dict__[n]  # left by processing this time; would block `register_parameter`
        for n, p in self.kernel_params.items():
            self.layer.register_parameter(n, p)
        for n, b in self.kernel_buffers.items():
            self.layer._buffers[n] = b
        for n, t in self.kernel_attrs.items():
            self.layer.__dict__[n] = t
        self.layer._non_persistent_buffers_set.clear()
        self.layer._non_persistent_buffers_set.update(self.non_persistent)
        self.live.release(sum(self.spec.params[n].nbytes for n in self.materialized))
        self.materialized.clear()

    def _closed_loader(self, *args: Any, **kwargs: Any) -> None:
        raise SyncError(f"{self.name} loaded twice: the layer was already complete and processed in this sync")

    # ------------------------------------------------------- commit/abort
    def missing(self) -> list[str]:
        """`name: loaded/expected` for each tensor not fully loaded."""
        if self.done:
            return []
        return [
            f"{self.name}.{n}: {self.loaded[n]}/{spec.load_numel} elements"
            for n, spec in self.spec.params.items()
            if self.loaded[n] < spec.load_numel
        ]

    def restore(self) -> None:
        """Put the (old) kernel tensors back, whatever state the layer is in; drop temporaries."""
        if not self.done:
            self._place_kernel_tensors()


class InPlaceLayer(SwappedLayer):
    """A layer whose load format is its kernel format, loaded straight into its kernel tensors.

    Same counting, loaded-twice guards and finish as `SwappedLayer`; the
    difference is that the kernel tensors never leave the layer: their
    `weight_loader`s are patched (restored at commit/abort) and the tensor a
    loader writes is the kernel tensor itself, so no load-format copy is ever
    alive. If processing replaces a parameter anyway, `finish` copies the new
    tensor into the kernel storage and puts the kernel tensor back, as for a
    swapped layer.
    """

    def swap_out(self) -> None:
        """Nothing leaves the layer; its kernel tensors' loaders are wrapped to count."""
        for n in self.spec.params:
            self.loaders[n] = self._make_loader(n)
            self.patches.set(self.kernel_params[n], self.loaders[n])

    def _materialize(self, pname: str, spec: TensorSpec) -> torch.Tensor:
        return self.kernel_params[pname]

    def restore(self) -> None:
        """Kernel tensors never left; contents after an abort are undefined (the engine stays FAILED)."""
        if not self.done:
            self._place_kernel_tensors()  # in case processing failed half-way after replacing a tensor


class ArrivalLayer:
    """A layer whose quant method quantizes each shard on arrival straight into kernel storage.

    The plugin's loaders write; this only counts shard elements against the
    capture's load-format numel; the layer is complete when they match.

    While the layer waits for shards, each kernel parameter whose dtype differs
    from its load format (an e4m3 `weight` that receives bf16 shards) is shown
    to vLLM's `load_weights` as a meta-device stand-in with the load format's
    shape and dtype (no storage). vLLM's loaders see the parameter the checkpoint
    tensor is for, so they do not log "Attempted to load weight ... with dtype
    torch.bfloat16 into parameter with dtype torch.float8_e4m3fn" for every
    correct FP8 shard; the stand-in's loader hands the real kernel tensor to
    the plugin's loader. The kernel parameters are back on the layer once it is
    complete, and on abort.
    """

    def __init__(self, name: str, layer: nn.Module, spec: LayerCapture, patches: LoaderPatches,
                 slot: Slot | None = None) -> None:
        self.name, self.layer, self.spec, self.patches = name, layer, spec, patches
        self.slot = slot or Slot()
        self.kernels: dict[str, tuple[torch.Tensor, Callable]] = {}
        """Each kernel parameter and the loader underneath its counting wrapper (for planned calls)."""
        self.total = spec.load_numel
        self.count = 0
        self.shards: set[tuple] = set()
        self.done = False
        self.kernel_params: dict[str, torch.Tensor] = {}
        """Kernel parameters replaced by load-format stand-ins until the layer is complete."""

    def swap_out(self) -> None:
        """Kernel tensors stay; their loaders are wrapped to count, behind load-format stand-ins where dtypes differ."""
        for pname, tensor in layer_tensors(self.layer)[0].items():
            loader = self._make_loader(pname, tensor, _loader_of(tensor, self.layer))
            load = self.spec.params.get(pname)
            if load is None or load.dtype == tensor.dtype or not isinstance(tensor, nn.Parameter):
                self.patches.set(tensor, loader)
                continue
            stand_in = nn.Parameter(torch.empty(load.shape, dtype=load.dtype, device="meta"), requires_grad=False)
            stand_in.weight_loader = loader
            self.kernel_params[pname] = tensor
            self.layer._parameters[pname] = stand_in

    def _make_loader(self, pname: str, kernel: torch.Tensor, original: Callable) -> Callable:
        self.kernels[pname] = (kernel, original)
        binder = binder_for(original)  # cached across syncs, per loader function
        result_of = getattr(original, "rlsync_deferred", None)

        def bind(args: tuple, kwargs: dict) -> tuple[Bound, tuple, int]:
            bound = binder.bind(args, kwargs)
            bound.arguments["param"] = kernel  # the plugin writes the kernel tensor, whatever vLLM was shown
            numel = vllm_tp.local_numel(self.layer, pname, bound.arguments)  # this rank's part under TP
            return bound, (pname, shard_key(bound)), numel

        def load(args: tuple, kwargs: dict) -> Any:
            bound, key, numel = bind(args, kwargs)
            record_call(self.slot, self.name, pname, key, numel, bound, None)
            return self._make(pname, key, numel, bound)

        def defer(rec: Recorder, args: tuple, kwargs: dict) -> Any:
            bound, key, numel = bind(args, kwargs)
            call = record_call(self.slot, self.name, pname, key, numel, bound, None)
            rec.defer(Deferred(self, pname, key, numel, bound, call))
            return result_of(bound.arguments)

        def rlsync_arrival_loader(*args: Any, **kwargs: Any) -> Any:
            rec = self.slot.recorder
            if rec is not None and result_of is not None:  # recording: made after vLLM's load_weights, see Deferred
                with rec.loader_call():
                    return defer(rec, args, kwargs)
            return loading(self.slot, lambda: load(args, kwargs))

        return rlsync_arrival_loader

    def _make(self, pname: str, key: tuple, numel: int, bound: Bound) -> Any:
        """One loader call: claimed, the plugin's loader called, counted; its result."""
        self._claim(key, numel)
        call_args, call_kwargs = bound.split()
        result = self.kernels[pname][1](*call_args, **call_kwargs)
        self._count(numel)
        return result

    def run_deferred(self, d: Deferred) -> None:
        """One deferred call made as it would have been made live."""
        self._make(d.pname, d.key, d.numel, d.bound)

    def _claim(self, key: tuple, numel: int) -> None:
        if self.done or key in self.shards or self.count + numel > self.total:
            raise SyncError(f"{self.name}.{key[0]} loaded twice (shard {dict(key[1]) or 'whole tensor'})")
        self.shards.add(key)

    def _count(self, numel: int) -> None:
        self.count += numel
        if self.count >= self.total:
            self.finish()

    def replay(self, call: PlannedCall, tensor: torch.Tensor) -> None:
        """One planned call: the plugin's loader called directly with the recorded arguments."""
        self._claim(call.key, call.numel)
        kernel, original = self.kernels[call.pname]
        call.call(original, kernel, tensor)
        self._count(call.numel)

    def batchable(self, call: PlannedCall) -> bool:
        """The parameter's loader takes many planned shards in one call (`rlsync_batch`)."""
        return hasattr(self.kernels[call.pname][1], "rlsync_batch")

    def replay_batch(self, calls: list[PlannedCall], tensors: list[torch.Tensor],
                     check: list[str | None] | None = None) -> None:
        """Planned calls for one parameter handed to its loader's `rlsync_batch` together; same checks, same counts.
        `check`: as `SwappedLayer.replay_batch` (no copy to fold it into here: one pass before the loader)."""
        bad = [n for n, t in zip(check or [], tensors, strict=False) if n is not None and not is_finite(t)]
        if bad:
            raise NonFiniteError(bad[0])
        for call in calls:
            self._claim(call.key, call.numel)
        kernel, original = self.kernels[calls[0].pname]
        original.rlsync_batch(kernel, [(c.loaded_view(t), c.named) for c, t in zip(calls, tensors, strict=True)])
        for call in calls:
            self._count(call.numel)

    def takes_stack(self, sc: StackedCall) -> bool:
        """`replay_stack` can replay it: whole slices, consecutive experts, one shard id, a stacking loader."""
        return (hasattr(self.kernels[sc.pname][1], "rlsync_stacked") and sc.experts is not None
                and sc.shard_id is not None and all(c.whole for c in sc.calls))

    def replay_stack(self, sc: StackedCall, names: tuple[str, ...], tensor: torch.Tensor, check: Collection[str]) -> None:
        """A stack's calls as one `rlsync_stacked` loader call; same checks and counts as `replay_batch`."""
        if any(n in check for n in names) and not is_finite(tensor):
            _refuse_nonfinite_slice(names, tensor, check)
        if self.done or not self.shards.isdisjoint(sc.keys) or self.count + sc.numel > self.total:
            key = next((k for k in sc.calls_keys() if k in self.shards), sc.calls[0].key)
            raise SyncError(f"{self.name}.{key[0]} loaded twice (shard {dict(key[1]) or 'whole tensor'})")
        self.shards |= sc.keys
        kernel, original = self.kernels[sc.pname]
        original.rlsync_stacked(kernel, tensor, sc.shard_id, sc.experts)
        self._count(sc.numel)

    def finish(self) -> None:
        self.done = True
        self._put_back()

    def _put_back(self) -> None:
        for pname, tensor in self.kernel_params.items():
            self.layer._parameters[pname] = tensor
        self.kernel_params.clear()

    def missing(self) -> list[str]:
        return [] if self.done else [f"{self.name}: {self.count}/{self.total} elements arrived"]

    def restore(self) -> None:
        """Kernel tensors back on the layer; contents after an abort are undefined."""
        self._put_back()
