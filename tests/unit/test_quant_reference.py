"""Reference FP8 quantizers on their own: per-shard scales, zeros, SQNR (no vLLM here).

The bit-for-bit comparison with vLLM's own quantizers imports vLLM, so it is in
the integration tier: tests/integration/test_quant_vs_vllm.py.

SQNR floor: e4m3 keeps 3 mantissa bits, so round-to-nearest leaves a relative
error uniform in +-2^-4 of each value's binade; its power relative to the
signal is about 2^-8 / 3, i.e. 10 log10(3 * 256) = 28.9 dB for values in the
normal range. Gaussian weights put almost every value there, so 28 dB is the
floor asserted (measured about 31.5 dB).
"""

import pytest
import torch

from rlsync.quant import reference as ref
from tests.unit.support import fp8_bits as bits
from tests.unit.support import random_weight as weight

SQNR_FLOOR_DB = 28.0


def test_per_tensor_shards_is_per_shard_per_tensor():
    w = torch.cat([weight((256, 64), 1, 0.02), weight((128, 64), 2, 0.5), weight((128, 64), 3, 0.001)])
    q, scales = ref.fp8_per_tensor_shards(w, [256, 128, 128])
    assert scales.shape == (3,)
    for i, (start, n) in enumerate([(0, 256), (256, 128), (384, 128)]):
        q_i, s_i = ref.fp8_per_tensor(w[start:start + n])
        assert torch.equal(bits(q[start:start + n]), bits(q_i)) and torch.equal(bits(scales[i:i + 1]), bits(s_i))
    one_q, one_s = ref.fp8_per_tensor_shards(w, [512])
    assert torch.equal(bits(one_q), bits(ref.fp8_per_tensor(w)[0]))
    with pytest.raises(ValueError, match="do not sum"):
        ref.fp8_per_tensor_shards(w, [256, 128])


def test_all_zero_tensor_quantizes_to_zero():
    q, scale = ref.fp8_per_tensor(torch.zeros(4, 8, dtype=torch.bfloat16))
    assert torch.equal(q.float(), torch.zeros(4, 8)) and float(scale) > 0


@pytest.mark.parametrize("scheme", ["tensor", "channel", "block"])
def test_sqnr_above_floor(scheme):
    w = weight((512, 384), seed=5)
    if scheme == "tensor":
        q, s = ref.fp8_per_tensor(w)
    elif scheme == "channel":
        q, s = ref.fp8_per_channel(w)
    else:
        q, s = ref.fp8_per_block(w)
    full = ref.expand_scale(s, tuple(w.shape), granularity=scheme)
    assert ref.sqnr_db(w, ref.dequantize(q, full)) > SQNR_FLOOR_DB
