"""`capture` on the hand-built toy layers of tests/unit/support.py (no vLLM)."""

import gc
import weakref

import torch
from torch import nn

from rlsync.reload import get_capture
from tests.unit.support import IN, ToyModel, build_toy


def test_capture_records_load_format_not_kernel_format():
    model = build_toy()
    layer = model.layers[0].qkv
    spec = get_capture(model).layers["layers.0.qkv"]
    w = spec.params["weight"]
    assert (w.shape, w.stride, w.dtype, w.cls) == ((32, IN), (IN, 1), torch.float32, nn.Parameter)
    assert w.attrs["output_dim"] == 0 and w.attrs["input_dim"] == 1
    assert w.weight_loader(layer) == layer.weight_loader  # re-bound to the layer
    assert set(spec.params) == {"weight", "bias"}
    assert spec.load_numel == 32 * IN + 32 and spec.load_bytes == (32 * IN + 32) * 4
    # the model is now in kernel format: int8, transposed, with a scale
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (IN, 32)
    assert "weight_scale" in layer._parameters and "weight_scale" not in spec.params


def test_capture_holds_no_tensors_and_no_model():
    model = build_toy()
    spec = get_capture(model).layers["layers.0.qkv"].params["weight"]
    assert not any(isinstance(v, torch.Tensor) for v in spec.attrs.values())
    meta = spec.build(model.layers[0].qkv, "meta")
    assert meta.is_meta and type(meta) is nn.Parameter and meta.output_dim == 0
    ref = weakref.ref(model)
    del model, meta
    gc.collect()
    assert ref() is None


def test_get_capture_without_capture_names_the_fix():
    import pytest

    with pytest.raises(ValueError, match="rlsync.reload.capture"):
        get_capture(ToyModel())
