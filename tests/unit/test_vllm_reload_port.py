"""vLLM's own reload tests, ported case by case to drive rlsync's reload backend: the toy-layer cases.

Upstream: vllm-project/vllm `tests/model_executor/model_loader/test_reload.py` at
commit 026bb17cfcc372d2123e192304cbf427ea7d0ee2. The v0.32.0 tag could not be
pinned from here; that file is a little newer than 0.32: its
`test_direct_weight_reload_*` / `test_runtime_view_*` cases exercise
`supports_direct_weight_reload` / `bind_runtime_weight_reload`, hooks vLLM 0.32
does not have. The cases that need a vLLM engine (or vLLM's distributed state)
are in tests/integration/test_vllm_reload_port.py.

Every upstream case keeps its name; each drives `rlsync.reload` (`capture` and
a `Reload` session) where upstream drives `record_metadata_for_reloading` /
`initialize_layerwise_reload` / `finalize_layerwise_reload`. As upstream, the
toys call their loaders directly between `Reload.begin()` and `commit()`.

Upstream's assertions are kept. Where one inspects vLLM-internal state (its
`LayerReloadingInfo`, `get_numel_loaded`, the meta-or-direct choice its hooks
make), the closest observable rlsync equivalent is asserted instead and a
comment says so. The mechanisms differ on purpose in two places, both
documented in `rlsync.reload`: a layer whose kernel format equals its load
format is always reloaded in place and processed again (vLLM skips processing
for methods that opt in), and any other layer is always swapped to load format
on meta (vLLM can bind a runtime view instead). Outcomes (values, `data_ptr`,
buffers) are asserted as upstream asserts them.

No vLLM import (unit tier): vLLM's two loader helpers are restated below, and
toy tensors without a loader get `default_weight_loader` explicitly (upstream
relies on vLLM wrapping every tensor; rlsync's fallback for a tensor without a
loader is vLLM's own `default_weight_loader`, which this tier cannot import).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from rlsync.errors import SyncError
from rlsync.reload import Reload, TensorSpec, capture


def default_weight_loader(param, loaded_weight):
    """vLLM 0.32's `default_weight_loader` (weight_utils.py), restated: same-size copy, scalars reshaped."""
    if param.numel() == 1 and loaded_weight.numel() == 1:
        param.data.copy_(loaded_weight.view(param.shape))
    else:
        assert param.size() == loaded_weight.size(), (tuple(loaded_weight.size()), tuple(param.size()))
        param.data.copy_(loaded_weight)


def composed_weight_loader(loader, fn):
    """vLLM 0.32's `composed_weight_loader`, restated: load, then transform the tensor in place."""

    def composed_loader(param, loaded_weight):
        loader(param, loaded_weight)
        param.data.copy_(fn(param))

    return composed_loader


def with_default_loaders(module: nn.Module) -> nn.Module:
    """Give every parameter without a loader `default_weight_loader` (see the module docstring)."""
    for p in module.parameters():
        if not hasattr(p, "weight_loader"):
            p.weight_loader = default_weight_loader
    return module


def begin(model: nn.Module) -> Reload:
    """rlsync's `initialize_layerwise_reload`: a session whose layers now take load-format writes."""
    session = Reload(model)
    session.begin()
    return session


def materialize_with_sentinel(monkeypatch, value: float) -> None:
    """Upstream's sentinel, on rlsync's materialization (`TensorSpec.build` off meta): every tensor a
    reload materializes starts as `value`, so anything not loaded shows."""
    build = TensorSpec.build

    def build_with_sentinel(self, layer, device):
        tensor = build(self, layer, device)
        if tensor.device.type != "meta":
            with torch.no_grad():
                tensor.fill_(value)
        return tensor

    monkeypatch.setattr(TensorSpec, "build", build_with_sentinel)


def poison(module: nn.Module, value: float) -> None:
    """The sentinel for layers reloaded in place (nothing materialized): poison the kernel storage."""
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def without_loader(attrs: dict) -> dict:
    """A tensor's attributes minus `weight_loader`: rlsync puts its counting loader there for the session."""
    return {k: v for k, v in attrs.items() if k != "weight_loader"}


# ---------------------------------------------------------------- toy layers (as upstream)
class _AliasedBufferLayer(nn.Module):
    def __init__(self):
        super().__init__()
        weight = torch.arange(6, dtype=torch.float32).reshape(2, 3)
        self.weight = nn.Parameter(weight)
        self.register_buffer("weight_view", self.weight.detach().view(-1), persistent=False)
        with_default_loaders(self)


class _ParentAliasedChildBufferLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.conv1d = nn.Linear(3, 2, bias=False)
        self.conv1d.weight.data.copy_(torch.arange(6, dtype=torch.float32).reshape(2, 3))
        self.register_buffer("conv_weights", self.conv1d.weight.detach().view(-1), persistent=False)
        with_default_loaders(self)


class _ChildAliasOnlyBufferLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1d = nn.Linear(3, 2, bias=False)
        self.conv1d.weight.data.copy_(torch.arange(6, dtype=torch.float32).reshape(2, 3))
        self.register_buffer("conv_weights", self.conv1d.weight.detach().view(-1), persistent=False)
        with_default_loaders(self)


class _AliasedBufferWithUninitializedChildLayer(_AliasedBufferLayer):
    def __init__(self):
        super().__init__()
        self.child = nn.Module()
        self.child.register_parameter("lazy_weight", UninitializedParameter(requires_grad=False))


class _NonPersistentBufferLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2, 2))
        self.register_buffer("scale", torch.tensor(0.25), persistent=False)
        with_default_loaders(self)


class _DirectReloadMethod:
    """Upstream subclasses vLLM's `QuantizeMethodBase`; rlsync only ever calls
    `process_weights_after_loading`, so the toy needs no vLLM base class."""

    def __init__(self, supported: bool):
        self.supported = supported
        self.process_calls = 0

    def process_weights_after_loading(self, layer):
        self.process_calls += 1

    def supports_direct_weight_reload(self, layer):  # a post-0.32 vLLM hook; rlsync never asks
        return self.supported


class _DirectReloadLayer(nn.Module):
    def __init__(self, supported: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.arange(6.0).reshape(2, 3))
        self.weight.weight_loader = default_weight_loader
        self.quant_method = _DirectReloadMethod(supported)


class _DirectReloadParameter(nn.Parameter):
    def load_merged_weight(self, loaded_weight):
        self.data.copy_(loaded_weight)


def _merged_weight_loader(param, loaded_weight):
    param.load_merged_weight(loaded_weight)


class _RuntimeViewReloadMethod(_DirectReloadMethod):
    def __init__(self):
        super().__init__(supported=False)

    def bind_runtime_weight_reload(self, layer, runtime_params):  # a post-0.32 vLLM hook; rlsync never asks
        raise AssertionError("rlsync does not bind runtime views")

    def process_weights_after_loading(self, layer):
        self.process_calls += 1
        layer.weight = nn.Parameter(layer.weight.t().contiguous())


class _RuntimeViewReloadLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.arange(6.0).reshape(2, 3))
        self.weight.weight_loader = default_weight_loader
        self.quant_method = _RuntimeViewReloadMethod()


class _ComposedLoaderLayer(nn.Module):
    """Mimics a Mamba2 mixer's equal-numel direct params (A, D, dt_bias); `A` uses
    `composed_weight_loader` (an extra in-place transform copy), like `MambaMixer2`'s `-exp(A_log)`."""

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.empty(4, dtype=torch.float32))
        self.D = nn.Parameter(torch.ones(4))
        self.dt_bias = nn.Parameter(torch.ones(4))
        self.A.weight_loader = composed_weight_loader(default_weight_loader, lambda x: -torch.exp(x.float()))
        self.D.weight_loader = default_weight_loader
        self.dt_bias.weight_loader = default_weight_loader


class _TransposeRecorder:
    """Processing that changes the format (a transposed kernel weight), so rlsync swaps the layer; it
    records the load-format tensors it is handed (rlsync's materialized layer)."""

    def __init__(self):
        self.seen: dict[str, tuple] = {}

    def process_weights_after_loading(self, layer):
        self.seen = {
            n: (t.device, t.dtype, t.shape, t.__class__, without_loader(t.__dict__), t.detach().clone())
            for n, t in layer.named_parameters()
        }
        layer.weight = nn.Parameter(layer.weight.data.t().contiguous(), requires_grad=False)


def _capture_and_process(layer: nn.Module) -> nn.Sequential:
    """What vLLM does at startup for a toy: capture the load format, then process once."""
    model = nn.Sequential(layer)
    capture(model)
    layer.quant_method.process_weights_after_loading(layer)
    return model


# ------------------------------------------------------------------------- unit-level cases
def test_move_metatensors():
    # upstream: to_meta_tensor / materialize_meta_tensor; rlsync: a captured `TensorSpec` built on meta / its device
    holder = nn.Module()
    holder.register_buffer("tensor", torch.empty((1, 2, 3)))
    tensor = holder.tensor
    spec = capture(holder).layers[""].buffers["tensor"]
    meta_tensor = spec.build(holder, "meta")
    materialized_tensor = spec.build(holder, spec.device)

    assert meta_tensor.device.type == "meta"
    assert tensor.device == materialized_tensor.device

    assert tensor.dtype == meta_tensor.dtype == materialized_tensor.dtype
    assert tensor.shape == meta_tensor.shape == materialized_tensor.shape
    assert tensor.__class__ == meta_tensor.__class__ == materialized_tensor.__class__
    assert tensor.__dict__ == meta_tensor.__dict__ == materialized_tensor.__dict__


def test_reload_lifecycle():
    layer = with_default_loaders(nn.Linear(2, 3))
    tensors = {n: (t.dtype, t.shape, t.__class__, without_loader(t.__dict__)) for n, t in layer.named_parameters()}
    layer.quant_method = _TransposeRecorder()  # rlsync restores on meta only layers that processing changes
    model = _capture_and_process(layer)

    session = begin(model)  # upstream: restore_layer_on_meta
    for name, (dtype, shape, cls, attrs) in tensors.items():
        meta_tensor = getattr(layer, name)
        assert meta_tensor.is_meta
        assert dtype == meta_tensor.dtype
        assert shape == meta_tensor.shape
        assert cls == meta_tensor.__class__
        assert attrs == without_loader(meta_tensor.__dict__)

    # upstream: materialize_layer; rlsync materializes each tensor on its first write and hands the
    # complete layer to processing, which records what it got
    for name, (_, shape, _, _) in tensors.items():
        getattr(layer, name).weight_loader(getattr(layer, name), torch.ones(shape))
    for name, (dtype, shape, cls, attrs) in tensors.items():
        device, m_dtype, m_shape, m_cls, m_attrs, _ = layer.quant_method.seen[name]
        assert device.type == "cpu"
        assert dtype == m_dtype
        assert shape == m_shape
        assert cls == m_cls
        assert attrs == m_attrs
    session.commit()


@pytest.mark.parametrize("supported", [True, False])
def test_direct_weight_reload_preserves_runtime_storage(supported):
    layer = _DirectReloadLayer(supported)
    model = nn.Sequential(layer)
    original_data_ptr = layer.weight.data_ptr()
    loaded_weight = torch.full_like(layer.weight, 7.0)

    capture(model)
    session = begin(model)

    # upstream: on meta unless the method opts in. rlsync has no opt-in: a layer whose kernel format is
    # its load format always passes through and is loaded in place, whatever the method says.
    assert not layer.weight.is_meta

    layer.weight.weight_loader(layer.weight, loaded_weight)
    session.commit()

    assert torch.equal(layer.weight, loaded_weight)
    assert layer.weight.data_ptr() == original_data_ptr
    # upstream: 0 processing calls when the method opts in, 1 otherwise. rlsync processes every complete
    # pass-through layer again (state derived from the weights, e.g. CPU oneDNN handles, is rebuilt).
    assert layer.quant_method.process_calls == 1


def test_direct_weight_reload_requires_matching_layout():
    layer = _DirectReloadLayer(supported=True)
    model = nn.Sequential(layer)

    capture(model)
    layer.weight = nn.Parameter(layer.weight.t().contiguous())
    layer.weight.weight_loader = default_weight_loader
    session = begin(model)

    assert layer.weight.is_meta
    session.abort()  # upstream leaves the reload open; rlsync puts the kernel tensor back
    assert not layer.weight.is_meta


def test_direct_weight_reload_restores_parameter_loading_metadata():
    layer = _DirectReloadLayer(supported=True)
    layer.weight = _DirectReloadParameter(layer.weight.data)
    layer.weight.weight_loader = _merged_weight_loader
    model = nn.Sequential(layer)
    loaded_weight = torch.full_like(layer.weight, 7.0)

    capture(model)
    original_data_ptr = layer.weight.data_ptr()
    layer.weight = nn.Parameter(layer.weight.data)
    session = begin(model)

    # rlsync: the kernel tensor's class differs from the captured one, so the layer is swapped to its
    # load format (class and loader restored, on meta) rather than patched in place as upstream does
    assert isinstance(layer.weight, _DirectReloadParameter)
    layer.weight.weight_loader(layer.weight, loaded_weight)
    session.commit()

    assert torch.equal(layer.weight, loaded_weight)
    assert layer.weight.data_ptr() == original_data_ptr


def test_runtime_view_reload_uses_existing_kernel_storage():
    layer = _RuntimeViewReloadLayer()
    model = nn.Sequential(layer)
    loaded_weight = torch.full_like(layer.weight, 7.0)

    capture(model)
    layer.quant_method.process_weights_after_loading(layer)
    original_data_ptr = layer.weight.data_ptr()
    session = begin(model)

    # upstream: not on meta (the method binds a runtime view of the kernel storage, a post-0.32 hook).
    # rlsync swaps the layer to its load format on meta, processes it and copies into kernel storage.
    assert layer.weight.is_meta
    layer.weight.weight_loader(layer.weight, loaded_weight)
    session.commit()

    assert torch.equal(layer.weight, loaded_weight.t())
    assert layer.weight.data_ptr() == original_data_ptr
    # upstream: 1 (load only; the bound view needs no processing). rlsync: load + this reload's processing.
    assert layer.quant_method.process_calls == 2


def test_materialize_layer_preserves_non_meta_tensors():
    """Ensure that materializing a layer does not overwrite non meta tensors."""
    layer = with_default_loaders(nn.Linear(2, 3, bias=True))
    layer.quant_method = _TransposeRecorder()
    model = _capture_and_process(layer)
    session = begin(model)

    # upstream builds the state by hand (meta weight, real bias); rlsync reaches it by loading the bias first
    bias_values = torch.ones(3)
    layer.bias.weight_loader(layer.bias, bias_values)
    assert layer.weight.is_meta
    assert not layer.bias.is_meta

    # materialize the layer weights after the bias is initialized (rlsync: the weight's first write)
    layer.weight.weight_loader(layer.weight, torch.full((3, 2), 2.0))
    seen = layer.quant_method.seen

    # Ensure the weight materialized off meta
    assert seen["weight"][0].type == "cpu"

    # Ensure that the bias is (still) not meta and values are unchanged
    assert seen["bias"][0].type == "cpu"
    assert torch.equal(seen["bias"][5], bias_values)
    session.commit()
    assert torch.equal(layer.bias.data, bias_values)


class _OneTensorLayer(nn.Module):
    def __init__(self, loader, *, numel=10, other=False):
        super().__init__()
        self.param = nn.Parameter(torch.zeros(numel), requires_grad=False)
        self.param.weight_loader = loader
        if other:  # a second tensor, so a double count would complete the layer too early
            self.other = nn.Parameter(torch.zeros(numel), requires_grad=False)
            self.other.weight_loader = default_weight_loader


def test_get_numel_loaded():
    def complex_weight_loader(param, loaded_weight):
        param[:3] = loaded_weight[:3]
        param[5:8] = loaded_weight[5:8]
        return "value"

    # upstream calls get_numel_loaded on the loader; rlsync counts inside its session loader: the
    # return value passes through, and the count shows in commit's "not fully loaded" report
    layer = _OneTensorLayer(complex_weight_loader)
    model = nn.Sequential(layer)
    capture(model)
    session = begin(model)
    ret = layer.param.weight_loader(layer.param, torch.empty(10))
    with pytest.raises(SyncError, match=r"0\.param: 6/10 elements"):  # num_loaded == 6
        session.commit()
    session.abort()
    assert ret == "value"


def test_get_numel_loaded_caps_at_param_size():
    # composed_weight_loader copies into the param twice (the load and the in-place post-load
    # transform), but only param.numel() distinct elements are loaded; a double count would complete
    # the layer early. rlsync: after `param` alone the layer still waits for `other`, and `param`
    # counts as fully loaded (10 of 10, not 20)
    loader = composed_weight_loader(default_weight_loader, lambda x: x + 1)
    layer = _OneTensorLayer(loader, other=True)
    model = nn.Sequential(layer)
    capture(model)
    session = begin(model)
    layer.param.weight_loader(layer.param, torch.ones(10))
    with pytest.raises(SyncError, match="not fully loaded") as err:
        session.commit()
    assert "0.other: 0/10" in str(err.value) and "0.param" not in str(err.value)
    session.abort()


def test_layerwise_reload_composed_loader_does_not_drop_params(monkeypatch):
    # Regression test: a composed_weight_loader param (A) used to double-count its elements,
    # finalizing the layer before the trailing param (D) was loaded.
    layer = _ComposedLoaderLayer()
    model = nn.Sequential(layer)
    materialize_with_sentinel(monkeypatch, float("nan"))
    poison(layer, float("nan"))  # rlsync loads this pass-through layer in place: poison the kernel storage

    loaded = {"A": torch.full((4,), 0.5), "dt_bias": torch.full((4,), 3.0), "D": torch.full((4,), 7.0)}

    capture(model)
    session = begin(model)
    # Mimic real load_weights: resolve params once, then load in checkpoint order with D last
    params = dict(layer.named_parameters())
    for name in ("A", "dt_bias", "D"):
        param = params[name]
        param.weight_loader(param, loaded[name])
    session.commit()

    assert torch.equal(layer.A, -torch.exp(loaded["A"]))
    assert torch.equal(layer.dt_bias, loaded["dt_bias"])
    assert torch.equal(layer.D, loaded["D"])


def test_layerwise_reload_skips_non_persistent_parameter_alias_buffers(monkeypatch):
    layer = _AliasedBufferLayer()
    model = nn.Sequential(layer)
    loaded_weight = torch.full_like(layer.weight, 7.0)
    materialize_with_sentinel(monkeypatch, -123.0)
    poison(layer, -123.0)  # rlsync loads this pass-through layer in place: the sentinel goes in kernel storage

    capture(model)
    session = begin(model)
    layer.weight.weight_loader(layer.weight, loaded_weight)
    session.commit()

    assert torch.equal(layer.weight, loaded_weight)
    assert layer.weight_view.untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr()
    assert "weight_view" in layer._non_persistent_buffers_set
    assert "0.weight_view" not in model.state_dict()


def test_capture_layer_to_meta_skips_uninitialized_parameter_storage_ptrs():
    layer = _AliasedBufferWithUninitializedChildLayer()

    model = nn.Sequential(layer)

    layers = capture(model).layers  # raised on the uninitialized child before (rlsync issue 12, bug 14)

    # upstream: "weight_view" not in the captured buffers (vLLM leaves alias buffers out of its restore
    # metadata). rlsync records buffers but never swaps or rebuilds them (limitation 5), so the
    # observable equivalents: the lazy parameter is skipped, and a reload keeps the alias intact.
    assert "0.child" not in layers and "lazy_weight" not in layers["0"].params
    session = begin(model)
    layer.weight.weight_loader(layer.weight, torch.full((2, 3), 7.0))
    session.commit()
    assert torch.equal(layer.weight_view, torch.full((6,), 7.0))
    assert layer.weight_view.untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr()


def test_layerwise_reload_skips_child_parameter_alias_buffers(monkeypatch):
    layer = _ParentAliasedChildBufferLayer()
    model = nn.Sequential(layer)
    loaded_conv = torch.full_like(layer.conv1d.weight, 7.0)
    loaded_scale = torch.full_like(layer.scale, 3.0)
    materialize_with_sentinel(monkeypatch, -123.0)
    poison(layer, -123.0)  # rlsync loads this pass-through layer in place: the sentinel goes in kernel storage

    capture(model)
    session = begin(model)
    layer.conv1d.weight.weight_loader(layer.conv1d.weight, loaded_conv)
    layer.scale.weight_loader(layer.scale, loaded_scale)
    session.commit()

    assert torch.equal(layer.conv1d.weight, loaded_conv)
    assert torch.equal(layer.conv_weights, loaded_conv.view(-1))
    assert layer.conv_weights.untyped_storage().data_ptr() == layer.conv1d.weight.untyped_storage().data_ptr()
    assert "conv_weights" in layer._non_persistent_buffers_set
    assert "0.conv_weights" not in model.state_dict()


def test_layerwise_reload_restores_alias_buffer_on_zero_size_layer(monkeypatch):
    layer = _ChildAliasOnlyBufferLayer()
    model = nn.Sequential(layer)
    loaded_conv = torch.full_like(layer.conv1d.weight, 7.0)
    materialize_with_sentinel(monkeypatch, -123.0)
    poison(layer, -123.0)  # rlsync loads this pass-through layer in place: the sentinel goes in kernel storage

    capture(model)
    session = begin(model)
    layer.conv1d.weight.weight_loader(layer.conv1d.weight, loaded_conv)
    session.commit()

    assert torch.equal(layer.conv_weights, loaded_conv.view(-1))
    assert layer.conv_weights.untyped_storage().data_ptr() == layer.conv1d.weight.untyped_storage().data_ptr()
    assert "conv_weights" in layer._non_persistent_buffers_set
    assert "0.conv_weights" not in model.state_dict()


def test_layerwise_reload_preserves_unloaded_non_persistent_buffers(monkeypatch):
    layer = _NonPersistentBufferLayer()
    model = nn.Sequential(layer)
    loaded_weight = torch.full_like(layer.weight, 7.0)
    original_scale = layer.scale.clone()
    materialize_with_sentinel(monkeypatch, -123.0)
    poison(layer, -123.0)  # rlsync loads this pass-through layer in place: the sentinel goes in kernel storage

    capture(model)
    session = begin(model)
    layer.weight.weight_loader(layer.weight, loaded_weight)
    session.commit()

    assert torch.equal(layer.weight, loaded_weight)
    assert torch.equal(layer.scale, original_scale)
    assert "scale" in layer._non_persistent_buffers_set
    assert "0.scale" not in model.state_dict()


@pytest.mark.skip(reason="rlsync.reload limitation 5: only parameters are reloaded; buffers are left as they "
                  "are and get no weight_loader during a reload (upstream loads the `scale` buffer through one)")
def test_layerwise_reload_updates_loaded_non_persistent_buffers():
    pass
