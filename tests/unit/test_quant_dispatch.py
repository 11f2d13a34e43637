"""Kernel dispatch: priority, override (config key and environment), collected reasons; kernel numerics.

These use only rlsync's own kernels (`emulated`, `torch_scaled_mm`); vLLM's
kernel is exercised in tests/integration/test_plugin_fp8.py.
"""

import pytest
import torch

from rlsync.errors import ConfigError
from rlsync.quant import reference as ref
from rlsync.quant.fp8_linear import Fp8Config, quantize_full
from rlsync.quant.kernels import (
    KERNEL_ENV,
    EmulatedKernel,
    KernelDispatchError,
    LinearDescriptor,
    TorchScaledMMKernel,
    choose_kernel,
)
from rlsync.quant.layout import QuantizedTensor

OURS = ["emulated", "torch_scaled_mm"]
WIDTHS = (64, 32, 32)


def desc_for(scheme, **kw):
    return LinearDescriptor(weight_layout=Fp8Config(scheme=scheme, block=(32, 32)).layout(), shape=(128, 96),
                            shard_widths=WIDTHS, **kw)


@pytest.fixture(autouse=True)
def no_env_override(monkeypatch):
    monkeypatch.delenv(KERNEL_ENV, raising=False)


def test_priority_picks_first_that_fits():
    assert isinstance(choose_kernel(desc_for("channel"), priority=OURS), EmulatedKernel)
    # Asking for FP8 activations skips the weight-only emulated kernel.
    assert isinstance(choose_kernel(desc_for("channel", activation="fp8_dynamic"), priority=OURS), TorchScaledMMKernel)


def test_forcing_a_kernel_that_cannot_implement_lists_every_reason():
    with pytest.raises(KernelDispatchError) as err:
        choose_kernel(desc_for("block"), "torch_scaled_mm", priority=OURS)
    reasons = err.value.reasons
    assert set(reasons) == set(OURS)
    assert "block" in reasons["torch_scaled_mm"]
    assert "not chosen" in reasons["emulated"]
    assert "forced kernel 'torch_scaled_mm'" in str(err.value) and "block" in str(err.value)


def test_nothing_fits_lists_every_reason():
    with pytest.raises(KernelDispatchError) as err:
        choose_kernel(desc_for("block", activation="fp8_dynamic"), priority=OURS)
    assert "weight-only" in err.value.reasons["emulated"] and "block" in err.value.reasons["torch_scaled_mm"]
    assert "no kernel can run a 128x96 float8_e4m3fn linear (block 32x32 scales, cpu)" in str(err.value)


def test_override_by_config_key_and_by_environment(monkeypatch):
    assert isinstance(choose_kernel(desc_for("channel"), "torch_scaled_mm", priority=OURS), TorchScaledMMKernel)
    monkeypatch.setenv(KERNEL_ENV, "torch_scaled_mm")
    assert isinstance(choose_kernel(desc_for("channel"), priority=OURS), TorchScaledMMKernel)
    # The config key wins over the environment.
    assert isinstance(choose_kernel(desc_for("channel"), "emulated", priority=OURS), EmulatedKernel)
    monkeypatch.setenv(KERNEL_ENV, "cutlass")
    with pytest.raises(ConfigError, match="unknown kernel 'cutlass'.*emulated"):
        choose_kernel(desc_for("channel"), priority=OURS)


def stored(scheme, seed=0):
    cfg = Fp8Config(scheme=scheme, block=(32, 32))
    w = (torch.randn(128, 96, generator=torch.Generator().manual_seed(seed)) * 0.05).to(torch.bfloat16)
    q, s = quantize_full(cfg, w, WIDTHS)
    return QuantizedTensor(data=q, scale=s, layout=cfg.layout(), shape=(128, 96), shard_widths=WIDTHS)


def test_matching_layout_skips_the_round_trip():
    qt = stored("channel")
    emulated = choose_kernel(desc_for("channel"), "emulated", priority=OURS)
    assert emulated.prep_weights_for_execution(qt) is qt
    smm = choose_kernel(desc_for("channel"), "torch_scaled_mm", priority=OURS)
    prepped = smm.prep_weights_for_execution(qt)
    assert prepped.data.shape == (96, 128) and prepped.data.data_ptr() == qt.data.data_ptr()  # a view, no copy
    assert prepped.scale.shape == (1, 128)


@pytest.mark.parametrize("scheme", ["tensor", "channel", "block"])
def test_emulated_kernel_is_dequantize_then_matmul(scheme):
    qt = stored(scheme)
    x = torch.randn(5, 96).to(torch.bfloat16)
    bias = torch.randn(128).to(torch.bfloat16)
    kernel = choose_kernel(desc_for(scheme), "emulated", priority=OURS)
    want = torch.nn.functional.linear(x, qt.dequantize(torch.bfloat16), bias)
    assert torch.equal(kernel.apply(kernel.prep_weights_for_execution(qt), x, bias), want)


@pytest.mark.parametrize("scheme", ["tensor", "channel"])
def test_torch_scaled_mm_agrees_with_emulated(scheme):
    """W8A8 vs weight-only: the only difference is the FP8 activation rounding (~29 dB, floor 25 dB)."""
    qt = stored(scheme, seed=1)
    x = torch.randn(3, 7, 96).to(torch.bfloat16)
    emulated = choose_kernel(desc_for(scheme), "emulated", priority=OURS)
    smm = choose_kernel(desc_for(scheme), "torch_scaled_mm", priority=OURS)
    a = emulated.apply(emulated.prep_weights_for_execution(qt), x, None)
    b = smm.apply(smm.prep_weights_for_execution(qt), x, None)
    assert b.shape == a.shape == (3, 7, 128)
    assert ref.sqnr_db(a.float(), b.float()) > 25.0


def test_config_rejects_unknown_keys_with_a_suggestion():
    assert Fp8Config.from_dict({"quant_method": "rlsync_fp8", "scheme": "block", "block": [64, 64]}).block == (64, 64)
    with pytest.raises(ConfigError, match="did you mean 'scheme'"):
        Fp8Config.from_dict({"schem": "block"})
    with pytest.raises(ConfigError, match="choose one of tensor, channel, block"):
        Fp8Config(scheme="row")
    with pytest.raises(ConfigError, match="kernel 'fast'"):
        Fp8Config(kernel="fast")
