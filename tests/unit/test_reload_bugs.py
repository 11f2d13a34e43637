"""Regression tests for reload bugs a peer found porting vLLM's reload tests (issue 12, items 12-14).

Each test failed before its fix. Toy layers only, no vLLM.
"""

import dataclasses

import pytest
import torch
from torch import nn

from rlsync.adapters import vllm_layers
from rlsync.reload import Reload, capture, get_capture, reload_weights
from tests.unit.support import IN, ToyModel, ToyQuant, build_toy, checkpoint_groups


def flat(groups):
    return [t for g in groups for t in g]


def params_by_name(model):
    return {n: (p, p.data_ptr()) for n, p in model.named_parameters()}


def assert_on_kernel_tensors(model, before):
    """Every parameter is the very kernel tensor it was (same object, same storage), none on meta,
    and no loader patched by the failed session is left behind."""
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for n, (param, ptr) in before.items():
        assert after[n] is param and not param.is_meta and param.data_ptr() == ptr, n
        assert getattr(getattr(param, "weight_loader", None), "__name__", "") != "rlsync_reload_loader", n


# ---------------------------------------------- 12: begin() failing part-way
def _break_spec(model, layer_name):
    """Make one layer's load format impossible to rebuild (its tensor class cannot be assigned), so
    `begin()` fails after earlier layers were already swapped to meta."""
    spec = get_capture(model).layers[layer_name]
    good = spec.params["weight"]
    spec.params["weight"] = dataclasses.replace(good, cls=int)
    return lambda: spec.params.__setitem__("weight", good)


def test_reload_weights_rolls_back_when_begin_fails_part_way():
    model = build_toy(seed=0)
    before = params_by_name(model)
    kernel = {n: p.detach().clone() for n, p in model.named_parameters()}
    repair = _break_spec(model, "layers.1.down")  # after layers.0.* and layers.1.qkv in module order
    with pytest.raises(TypeError):
        reload_weights(model, flat(checkpoint_groups(1)))
    assert_on_kernel_tensors(model, before)
    for n, p in model.named_parameters():
        assert torch.equal(p, kernel[n]), n  # begin() wrote nothing
    repair()
    reload_weights(model, flat(checkpoint_groups(1)))  # the model is still reloadable
    assert_on_kernel_tensors(model, before)


def test_begin_failure_closes_the_session_and_restores_loaders():
    model = build_toy(seed=0)
    before = params_by_name(model)
    loaders = {n: getattr(p, "weight_loader", None) for n, p in model.named_parameters()}
    _break_spec(model, "layers.1.down")
    session = Reload(model)
    with pytest.raises(TypeError):
        session.begin()
    assert not session.open and session.layers == []
    assert_on_kernel_tensors(model, before)
    assert {n: getattr(p, "weight_loader", None) for n, p in model.named_parameters()} == loaders


# ------------------------------- 13: processing leaves a plain tensor attribute
class PlainAttrQuant:
    """Processing that replaces the `weight` parameter by a plain tensor attribute
    (`del layer.weight; layer.weight = tensor`), transposed and scaled."""

    def __init__(self):
        self.num_processed = 0

    def process_weights_after_loading(self, layer):
        w = layer.weight.data
        del layer.weight
        layer.weight = (w * 2).t().contiguous()  # not a Parameter: a plain attribute
        self.num_processed += 1


def _qkv_weight(groups, i):
    tensors = dict(flat(groups))
    return torch.cat([tensors[f"layers.{i}.{s}.weight"] for s in ("q", "k", "v")])


def test_plain_tensor_attribute_left_by_processing_is_recorded_and_reloaded():
    model = build_toy(seed=0, quant_factory=PlainAttrQuant)
    layer = model.layers[0].qkv
    kernel = layer.__dict__["weight"]
    assert "weight" not in layer._parameters and kernel.shape == (IN, 32)
    ptr = kernel.data_ptr()
    kernel.fill_(float("nan"))  # poison: the reload must overwrite every element

    reload_weights(model, flat(checkpoint_groups(1)))  # KeyError: "attribute 'weight' already exists" before

    recorded = get_capture(model).layers["layers.0.qkv"].kernel["weight"]
    assert recorded.is_attr and recorded.shape == (IN, 32)
    assert layer.__dict__["weight"] is kernel and kernel.data_ptr() == ptr
    assert "weight" not in layer._parameters
    assert torch.equal(kernel, (_qkv_weight(checkpoint_groups(1), 0) * 2).t())
    assert layer.quant_method.num_processed == 2  # at load, and once in the reload


def test_plain_tensor_attribute_restored_on_abort():
    model = build_toy(seed=0, quant_factory=PlainAttrQuant)
    layer = model.layers[0].qkv
    kernel = layer.__dict__["weight"]
    session = Reload(model)
    session.begin()
    assert layer._parameters["weight"].is_meta  # swapped: the load-format parameter, on meta
    session.abort()
    assert layer.__dict__["weight"] is kernel and "weight" not in layer._parameters


# ------------------------------------------- 14: uninitialized (lazy) parameters
def test_capture_skips_uninitialized_parameters_and_reload_leaves_them():
    model = ToyModel(ToyQuant)
    lazy = nn.UninitializedParameter(requires_grad=False)
    model.layers[0].qkv.register_parameter("lazy", lazy)  # beside a swapped layer's parameters
    only_lazy = nn.Module()
    only_lazy.register_parameter("lazy", nn.UninitializedParameter(requires_grad=False))
    model.extra = only_lazy
    capture(model)  # "Can't access the shape of an uninitialized parameter" before
    model.tie()
    model.load_weights(flat(checkpoint_groups(0)))
    for module in model.modules():
        vllm_layers.process_layer(module)

    layers = get_capture(model).layers
    assert "lazy" not in layers["layers.0.qkv"].params and "extra" not in layers
    before = {n: p for n, p in model.named_parameters() if n != "layers.0.qkv.lazy"}
    reload_weights(model, flat(checkpoint_groups(1)))
    assert model.layers[0].qkv._parameters["lazy"] is lazy and only_lazy._parameters["lazy"] is not None
    assert all(dict(model.named_parameters())[n] is p for n, p in before.items())
