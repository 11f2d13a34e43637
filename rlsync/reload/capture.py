"""Capture: every layer's load format, recorded before processing rewrites it.

Once `process_weights_after_loading` has run, a layer's parameters are in
kernel format (FP8 transposed with scales, repacked, ...) and the format the
weight loaders expect is gone. `capture(model)` records it while it still
exists, right after vLLM constructs the model (see
`vllm_load.capture_at_load`): for every parameter and buffer its shape,
stride, dtype, tensor class, attributes (`weight_loader`, `output_dim`,
`input_dim`, `packed_dim`, `pack_factor`, ...), device and how many checkpoint
elements it receives. It keeps no tensor storage at all: a spec rebuilds the
tensor on the meta device or materializes it on demand.

`record_kernel_format(model)` records, per layer, the tensors processing left
(names, shapes, strides, dtypes, classes). The difference to the load format
is what processing creates (`weight_scale`, ...), which a reload deletes
before loading and recreates by processing again; a layer with no difference
at all `passes_through` and is reloaded in place. The first reload records it
if nobody did. Processing that leaves a plain (unregistered) tensor attribute
under a load-format parameter's name (`del layer.weight; layer.weight = t`)
is recorded too (`KernelSpec.is_attr`), so a reload can move it aside and put
it back.

Uninitialized (lazy) parameters and buffers (`torch.nn.UninitializedParameter`,
`UninitializedBuffer`) have no shape to record; like vLLM's reload, the
capture skips them, so a reload leaves them on their layer untouched.

Captures live in a weak dictionary keyed by the model; attributes that are
methods bound to the layer (vLLM's `weight_loader`s) are stored unbound, so the
capture never keeps a model alive.
"""

from __future__ import annotations

import dataclasses
import types
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from rlsync.adapters import vllm_load


def layer_tensors(layer: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The layer's own (parameters, buffers), without unset (None) and uninitialized (lazy) ones."""
    return (
        {n: p for n, p in layer._parameters.items() if p is not None and not is_lazy(p)},
        {n: b for n, b in layer._buffers.items() if b is not None and not is_lazy(b)},
    )


def plain_tensor_attrs(layer: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Tensors set as plain attributes (neither parameter nor buffer) under `names` on `layer`."""
    return {n: t for n in names if isinstance(t := layer.__dict__.get(n), torch.Tensor)}


@dataclasses.dataclass(frozen=True, slots=True)
class _BoundToLayer:
    """A method bound to the captured layer, stored unbound (no reference to the layer)."""

    func: Any


@dataclasses.dataclass(kw_only=True, slots=True)
class TensorSpec:
    """One parameter or buffer in load format."""

    name: str
    """Attribute name on its layer (`weight`, `bias`, ...)."""
    is_buffer: bool
    """Registered as a buffer rather than a parameter."""
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    cls: type
    """Tensor class (`Parameter`, vLLM's `ModelWeightParameter`, ...)."""
    attrs: dict[str, Any]
    """The tensor's `__dict__`, loaders unwrapped, layer-bound methods stored unbound."""
    device: torch.device
    """Where to materialize it (the load device at capture)."""
    load_numel: int
    """Checkpoint elements it receives (`weight_loader_numel` where a creator declares padding)."""

    @property
    def numel(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def weight_loader(self, layer: nn.Module) -> Any | None:
        """The captured loader, bound to `layer` where it was a method of the layer; None if unset."""
        return _rebind(self.attrs.get("weight_loader", self.attrs.get("_weight_loader")), layer)

    def build(self, layer: nn.Module, device: torch.device | str) -> torch.Tensor:
        """A fresh tensor in load format on `device` ("meta" costs no memory), attributes rebound to `layer`."""
        tensor = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=device, requires_grad=False)
        tensor.__class__ = self.cls
        tensor.__dict__ = {k: _rebind(v, layer) for k, v in self.attrs.items()}
        return tensor


def _rebind(value: Any, layer: nn.Module) -> Any:
    return value.func.__get__(layer) if isinstance(value, _BoundToLayer) else value


def _sanitize(value: Any, layer: nn.Module) -> Any:
    value = vllm_load.original_weight_loader(value) if callable(value) else value
    if isinstance(value, types.MethodType) and value.__self__ is layer:
        return _BoundToLayer(value.__func__)
    return value


def _spec(name: str, tensor: torch.Tensor, layer: nn.Module, *, is_buffer: bool) -> TensorSpec:
    return TensorSpec(
        name=name,
        is_buffer=is_buffer,
        shape=tuple(tensor.shape),
        stride=tuple(tensor.stride()),
        dtype=tensor.dtype,
        cls=type(tensor),
        attrs={k: _sanitize(v, layer) for k, v in tensor.__dict__.items()},
        device=torch.get_default_device() if tensor.is_meta else tensor.device,
        load_numel=int(getattr(tensor, "weight_loader_numel", tensor.numel())),
    )


@dataclasses.dataclass(kw_only=True, slots=True)
class KernelSpec:
    """A tensor as processing left it: what every reload must reproduce."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    cls: type
    is_buffer: bool
    is_attr: bool = False
    """A plain tensor attribute (not registered) under a load-format parameter's name."""

    @staticmethod
    def of(tensor: torch.Tensor, *, is_buffer: bool, is_attr: bool = False) -> KernelSpec:
        return KernelSpec(
            shape=tuple(tensor.shape), stride=tuple(tensor.stride()), dtype=tensor.dtype, cls=type(tensor),
            is_buffer=is_buffer, is_attr=is_attr,
        )

    @property
    def is_param(self) -> bool:
        return not (self.is_buffer or self.is_attr)

    def matches(self, spec: TensorSpec) -> bool:
        """This kernel tensor has exactly the load format `spec` (so loaders can write it in place)."""
        return self.is_param and (self.shape, self.stride, self.dtype, self.cls, self.is_buffer) == (
            spec.shape, spec.stride, spec.dtype, spec.cls, spec.is_buffer)


@dataclasses.dataclass(kw_only=True, slots=True)
class LayerCapture:
    """One module's load format (and, once recorded, its kernel format)."""

    name: str
    """Qualified module name in the model."""
    params: dict[str, TensorSpec]
    buffers: dict[str, TensorSpec]
    non_persistent: frozenset[str]
    """Buffer names registered with `persistent=False`."""
    kernel: dict[str, KernelSpec] | None = None
    """Tensors after processing (None until recorded)."""

    @property
    def load_numel(self) -> int:
        """Checkpoint elements the layer's parameters receive in one full load."""
        return sum(spec.load_numel for spec in self.params.values())

    @property
    def load_bytes(self) -> int:
        """Bytes of the layer's parameters in load format, materialized."""
        return sum(spec.nbytes for spec in self.params.values())

    @property
    def created_by_processing(self) -> set[str]:
        """Kernel tensors that do not exist in load format (a reload deletes and recreates them).

        A plain attribute under a parameter's name (`is_attr`) is not among them: it replaces the parameter.
        """
        if self.kernel is None:
            raise ValueError(f"{self.name}: kernel format not recorded yet")
        return set(self.kernel) - set(self.params) - set(self.buffers)

    @property
    def passes_through(self) -> bool:
        """Processing leaves every parameter in its load format (embeddings, LM heads, norms; on GPU
        unquantized linears): same names, shapes, strides, dtypes and tensor classes, nothing created.

        Such a layer is reloaded in place: its loaders write straight into the kernel tensors.
        """
        if self.kernel is None:
            raise ValueError(f"{self.name}: kernel format not recorded yet")
        kernel_params = {n: k for n, k in self.kernel.items() if k.is_param}
        return (
            not self.created_by_processing
            and kernel_params.keys() == self.params.keys()
            and all(kernel_params[n].matches(spec) for n, spec in self.params.items())
        )


@dataclasses.dataclass(kw_only=True, slots=True)
class ModelCapture:
    """Load formats of every module of one model."""

    layers: dict[str, LayerCapture]
    vllm_config: Any | None
    """The vLLM config the model was built with (None for models built outside vLLM)."""

    @property
    def quantization(self) -> str | None:
        if self.vllm_config is None:
            return None
        return self.vllm_config.model_config.quantization


_CAPTURES: weakref.WeakKeyDictionary[nn.Module, ModelCapture] = weakref.WeakKeyDictionary()


def capture(model: nn.Module) -> ModelCapture:
    """Record the load format of every module of `model`; call before processing.

    Replaces any earlier capture of the same model. Uninitialized (lazy) tensors are skipped.
    """
    layers = {}
    for name, layer in model.named_modules():
        own_params, own_buffers = layer_tensors(layer)
        params = {n: _spec(n, p, layer, is_buffer=False) for n, p in own_params.items()}
        buffers = {n: _spec(n, b, layer, is_buffer=True) for n, b in own_buffers.items()}
        if params or buffers:
            layers[name] = LayerCapture(
                name=name, params=params, buffers=buffers, non_persistent=frozenset(layer._non_persistent_buffers_set)
            )
    result = ModelCapture(layers=layers, vllm_config=vllm_load.current_vllm_config())
    _CAPTURES[model] = result
    return result


def get_capture(model: nn.Module) -> ModelCapture:
    """The capture taken when `model` was built; `ValueError` if there is none."""
    result = _CAPTURES.get(model)
    if result is None:
        raise ValueError(
            f"{type(model).__name__} has no rlsync capture of its load format: build the engine with "
            "rlsync.engine.VLLMEngine (which captures at load), or call rlsync.reload.capture(model) "
            "before process_weights_after_loading"
        )
    return result


def record_kernel_format(model: nn.Module) -> None:
    """Record, for every captured module, the tensors processing left; call after processing.

    Parameters, buffers, and tensors processing left as plain attributes under a
    load-format parameter's name; uninitialized (lazy) tensors are skipped.
    """
    result = get_capture(model)
    for name, layer in model.named_modules():
        spec = result.layers.get(name)
        if spec is None:
            continue
        params, buffers = layer_tensors(layer)
        kernel = {n: KernelSpec.of(p, is_buffer=False) for n, p in params.items()}
        kernel.update({n: KernelSpec.of(b, is_buffer=True) for n, b in buffers.items()})
        attrs = plain_tensor_attrs(layer, spec.params)
        kernel.update({n: KernelSpec.of(t, is_buffer=False, is_attr=True) for n, t in attrs.items()})
        spec.kernel = kernel
