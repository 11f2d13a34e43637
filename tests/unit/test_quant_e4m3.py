"""`e4m3.from_fp32` gives torch's fp32 -> float8_e4m3fn bits (the whole proof: scripts/check_e4m3_cast.py)."""

import pytest
import torch

from rlsync.quant import e4m3


def _patterns() -> torch.Tensor:
    """A strided sample of all fp32 bit patterns, plus every e4m3 rounding boundary and its neighbours."""
    sample = torch.arange(-(1 << 31), 1 << 31, 4099, dtype=torch.int64)
    codes = torch.arange(256, dtype=torch.int64).to(torch.uint8).view(torch.float8_e4m3fn).float()
    finite = codes[torch.isfinite(codes)].unique()
    mids = (finite[1:] + finite[:-1]) / 2  # ties: round to even
    edges = torch.cat([finite, mids, torch.tensor([448.0, 464.0, 480.0, 2.0**-6, 2.0**-9, 2.0**-10, 1e-45, 3e38])])
    bits = edges.view(torch.int32).to(torch.int64)
    near = (bits[:, None] + torch.arange(-3, 4)).flatten()
    signed = torch.cat([near, near | (1 << 31)])
    special = torch.tensor([0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0, 1 << 31], dtype=torch.int64)
    every = torch.cat([sample, signed, special])
    every = every & 0xFFFFFFFF
    return torch.where(every >= 1 << 31, every - (1 << 32), every).to(torch.int32)


def test_same_bits_as_torch_cast_eager_and_compiled():
    x = _patterns().view(torch.float32)
    want = x.to(torch.float8_e4m3fn).view(torch.uint8)
    for fn in (e4m3.from_fp32, torch.compile(e4m3.from_fp32, dynamic=True)):
        have = fn(x).view(torch.uint8)
        bad = (have != want).nonzero().flatten()
        assert len(bad) == 0, [(hex(int(x[i].view(torch.int32)) & 0xFFFFFFFF), int(have[i]), int(want[i])) for i in bad[:5]]


def test_refuses_other_dtypes():
    with pytest.raises(TypeError, match="float32"):
        e4m3.from_fp32(torch.ones(3, dtype=torch.bfloat16))
