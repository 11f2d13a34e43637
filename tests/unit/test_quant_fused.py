"""The fused (compiled) quantizers give exactly the reference's bits, on any shape."""

import pytest
import torch

from rlsync.quant import fused, reference

SHAPES = [(5632, 1024), (1536, 1024), (257, 129), (7, 5), (128, 384), (1, 1)]


def bits(t):
    return t.contiguous().view(torch.uint8 if t.element_size() == 1 else torch.int32)


def weight(shape, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 0.1
    w[0, 0] = 0.0
    if shape[0] > 2:
        w[2] = 0.0  # an all-zero row: the clamped minimum scale
    return w.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_quantizers_are_bit_identical(shape, dtype):
    w = weight(shape, seed=hash(shape) % 1000, dtype=dtype)
    q, s = fused.fp8_per_channel(w)
    qr, sr = reference.fp8_per_channel(w)
    assert torch.equal(bits(q), bits(qr)) and torch.equal(s, sr)
    scale = reference.per_tensor_scale(w)
    assert torch.equal(bits(fused.quantize_with_tensor_scale(w, scale)),
                       bits(reference.quantize_with_tensor_scale(w, scale)))
    # the compiled code ran (a compile failure would silently compare eager with eager)
    for fn in (fused.fp8_per_channel, fused.quantize_with_tensor_scale):
        assert fn.failures == [], fn.failures


def test_disabled_fused_path_runs_the_reference(monkeypatch):
    monkeypatch.setenv("RLSYNC_FUSED_QUANT", "0")
    assert not fused.enabled()
    w = weight((64, 32), seed=1)
    q, s = fused.fp8_per_channel(w)
    qr, sr = reference.fp8_per_channel(w)
    assert torch.equal(bits(q), bits(qr)) and torch.equal(s, sr)


def _off_by_one(q):
    return (q.view(torch.uint8) ^ 1).view(torch.float8_e4m3fn)


def test_compiled_code_that_differs_from_eager_is_dropped_on_first_use():
    """The first call per device and input kind compares the compiled bits with eager; a difference (another torch,
    another backend) means eager from then on, with a warning, and the caller gets the reference's bits."""
    f = fused._Fused(reference.fp8_per_channel, runtime_max=True)
    calls = []

    def wrong(w, *args, **kwargs):
        calls.append(1)
        q, s = reference.fp8_per_channel(w)
        return _off_by_one(q), s

    f.compiled["cpu"] = wrong
    w = weight((64, 32), seed=3)
    qr, sr = reference.fp8_per_channel(w)
    with pytest.warns(RuntimeWarning, match="differs from the eager reference"):
        q, s = f(w)
    assert torch.equal(bits(q), bits(qr)) and torch.equal(s, sr)
    assert f.mismatches and len(calls) == 1
    q, s = f(w)
    assert torch.equal(bits(q), bits(qr)) and len(calls) == 1  # eager now, the compiled code is not called again


def test_in_place_compiled_code_is_checked_per_scheme():
    """`stacked_fp8_into` writes its outputs; the check compares what it wrote, separately for each scheme."""
    f = fused._Fused(reference.stacked_fp8_into, writes=(2, 3), runtime_max=True)

    def wrong_for_tensor(scheme, w, q, s, **kwargs):
        reference.stacked_fp8_into(scheme, w, q, s)
        if scheme == "tensor":
            q.copy_(_off_by_one(q))

    f.compiled["cpu"] = wrong_for_tensor
    w = weight((3 * 16, 24), seed=4).view(3, 16, 24)
    for scheme, scale_shape in (("channel", (3, 16, 1)), ("tensor", (3, 1))):
        q, s = torch.empty(w.shape, dtype=torch.float8_e4m3fn), torch.empty(scale_shape)
        qr, sr = torch.empty_like(q), torch.empty_like(s)
        reference.stacked_fp8_into(scheme, w, qr, sr)
        if scheme == "tensor":
            with pytest.warns(RuntimeWarning, match="differs"):
                f(scheme, w, q, s)
        else:
            f(scheme, w, q, s)
        assert torch.equal(bits(q), bits(qr)) and torch.equal(s, sr), scheme
    assert [k[1][0] for k, ok in f.checked.items() if not ok] == ["tensor"]
    assert [k[1][0] for k, ok in f.checked.items() if ok] == ["channel"]


def test_compile_if_keeps_a_device_on_eager():
    f = fused._Fused(reference.quantize_with_tensor_scale, compile_if=lambda device, args: False)
    w = weight((16, 8), seed=5)
    scale = reference.per_tensor_scale(w)
    assert torch.equal(bits(f(w, scale)), bits(reference.quantize_with_tensor_scale(w, scale)))
    assert f.compiled == {} and f.checked == {}


def test_abs_max_and_every_fused_function_ran_compiled_and_checked():
    w = weight((257, 129), seed=6)
    assert torch.equal(fused.abs_max(w), w.float().abs().max().to(w.dtype))
    fused.fp8_per_channel(w)
    fused.quantize_with_tensor_scale(w, reference.per_tensor_scale(w))
    for fn in (fused.fp8_per_channel, fused.quantize_with_tensor_scale, fused.abs_max):
        assert fn.failures == [] and fn.mismatches == [], (fn.__name__, fn.failures, fn.mismatches)
        assert any(device == "cpu" and ok for (device, _), ok in fn.checked.items()), fn.__name__
