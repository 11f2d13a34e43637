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
