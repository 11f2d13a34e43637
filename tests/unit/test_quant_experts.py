"""FP8 experts (`rlsync.quant.fp8_moe`): per-expert reference, quantize-on-arrival per expert shard, the forward."""

import random

import pytest
import torch
import torch.nn.functional as F

from rlsync.quant import reference as ref
from rlsync.quant.fp8_linear import Fp8Config, PendingRows, quantize_full
from rlsync.quant.fp8_moe import (
    W2,
    W13,
    ExpertShapes,
    experts_forward,
    quantize_expert_shard_into,
    quantize_expert_shards_into,
    quantize_experts,
)
from tests.unit.support import fp8_bits

# I = 72: with 32-row blocks the gate / up boundary (row 72) falls inside block row 2, so that
# block row straddles two shards of every expert and waits for both.
SHAPES = ExpertShapes(num_experts=4, hidden=96, intermediate=72)
CONFIGS = [Fp8Config(scheme="tensor"), Fp8Config(scheme="channel"), Fp8Config(scheme="block", block=(32, 32))]


def _experts(seed=0):
    gen = torch.Generator().manual_seed(seed)
    e, h, i = SHAPES.num_experts, SHAPES.hidden, SHAPES.intermediate
    w13 = (torch.randn(e, 2 * i, h, generator=gen) * 0.02).to(torch.bfloat16)
    w2 = (torch.randn(e, h, i, generator=gen) * 0.02).to(torch.bfloat16)
    w13[1, 5:9] *= 40  # outliers in one expert's gate rows: per-expert scales must not leak
    return {W13: w13, W2: w2}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.scheme)
def test_reference_is_the_linear_scheme_per_expert(config):
    for name, w in _experts().items():
        q, s = quantize_experts(config, w, SHAPES.widths(name))
        assert tuple(s.shape) == SHAPES.scale_shape(config, name)
        for e in range(SHAPES.num_experts):
            q_e, s_e = quantize_full(config, w[e], SHAPES.widths(name))
            assert torch.equal(fp8_bits(q[e]), fp8_bits(q_e)) and torch.equal(s[e], s_e)
    if config.scheme == "tensor":  # one scale per expert and shard (gate, up): the outlier moves one only
        _, s13 = quantize_experts(config, _experts()[W13], SHAPES.widths(W13))
        assert s13[1, 0] > 10 * s13[1, 1] and s13[1, 0] > 10 * s13[0, 0]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.scheme)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_arrival_per_expert_shard_in_any_order_equals_the_reference(config, seed):
    """Every (expert, shard) checkpoint tensor quantized as it arrives, shuffled, over NaN-poisoned storage."""
    experts = _experts(seed)
    arrivals = []
    for e in range(SHAPES.num_experts):
        i = SHAPES.intermediate
        arrivals += [(W13, e, "w1", experts[W13][e, :i]), (W13, e, "w3", experts[W13][e, i:]), (W2, e, "w2", experts[W2][e])]
    random.Random(seed).shuffle(arrivals)
    stored = {}
    for name, w in experts.items():
        q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
        q.view(torch.uint8).fill_(0x7F)  # e4m3 NaN
        stored[name] = (q, torch.full(SHAPES.scale_shape(config, name), float("nan")),
                        [PendingRows() for _ in range(SHAPES.num_experts)])
    for name, e, shard, tensor in arrivals:
        q, s, pending = stored[name]
        quantize_expert_shard_into(config, q, s, SHAPES.widths(name), e, shard, tensor.float(), torch.bfloat16,
                                   pending=pending)
    for name, w in experts.items():
        want_q, want_s = quantize_experts(config, w, SHAPES.widths(name))
        q, s, pending = stored[name]
        assert torch.equal(fp8_bits(q), fp8_bits(want_q)), name
        assert torch.equal(s, want_s), name
        # Held straddling rows: under one block height per expert of w13 (the gate / up boundary), none for w2.
        held = sum(p.num_rows() for p in pending)
        assert held <= (SHAPES.num_experts * (config.block[0] - 1) if name == W13 and config.scheme == "block" else 0)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.scheme)
@pytest.mark.parametrize("layout", ["evenly-spaced", "separate", "reversed"])
def test_many_shards_at_once_equal_the_reference(config, layout):
    """`quantize_expert_shards_into` (what a replayed sync plan calls): one call for every expert's gates, ups and
    downs when they are evenly spaced views of one buffer (as transformers' reversed conversion leaves them), one
    call each otherwise (separate tensors, experts out of order, block scheme); the bits are the reference's
    either way. `chunk_elems` forces several calls per run."""
    experts = _experts(3)
    i, n = SHAPES.intermediate, SHAPES.num_experts
    order = list(range(n))[::-1] if layout == "reversed" else list(range(n))
    runs = {("w1", W13): experts[W13][:, :i], ("w3", W13): experts[W13][:, i:], ("w2", W2): experts[W2]}
    stored = {}
    for name, w in experts.items():
        q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
        q.view(torch.uint8).fill_(0x7F)
        stored[name] = (q, torch.full(SHAPES.scale_shape(config, name), float("nan")), [PendingRows() for _ in range(n)])
    for (shard, name), w in runs.items():
        w = w.contiguous() if layout != "separate" else w
        tensors = [w[e] if layout != "separate" else w[e].clone() for e in order]
        q, s, pending = stored[name]
        quantize_expert_shards_into(config, q, s, SHAPES.widths(name), shard, order, tensors, torch.bfloat16,
                                    pending=pending, chunk_elems=3 * w[0].numel())
    for name, w in experts.items():
        want_q, want_s = quantize_experts(config, w, SHAPES.widths(name))
        q, s, _ = stored[name]
        assert torch.equal(fp8_bits(q), fp8_bits(want_q)), name
        assert torch.equal(s, want_s), name


def test_stacked_quantizer_is_the_2d_reference_per_weight():
    w = (torch.randn(5, 40, 24) * 0.02).to(torch.bfloat16)
    w[2, 3] *= 100
    for scheme, ref_fn, scale_shape in (("channel", ref.fp8_per_channel, (5, 40, 1)), ("tensor", ref.fp8_per_tensor, (5, 1))):
        q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
        s = torch.empty(scale_shape)
        ref.stacked_fp8_into(scheme, w, q, s)
        for e in range(5):
            q_e, s_e = ref_fn(w[e])
            assert torch.equal(fp8_bits(q[e]), fp8_bits(q_e)) and torch.equal(s[e], s_e.reshape(s[e].shape)), (scheme, e)
    with pytest.raises(ValueError, match="block"):
        ref.stacked_fp8_into("block", w, q, s)


def test_arrival_refuses_what_it_cannot_place():
    config = Fp8Config(scheme="channel")
    q = torch.empty(SHAPES.num_experts, *SHAPES.shape(W13), dtype=torch.float8_e4m3fn)
    s = torch.empty(SHAPES.scale_shape(config, W13))
    shard = torch.zeros(SHAPES.intermediate, SHAPES.hidden)
    with pytest.raises(ValueError, match="unknown expert shard id"):
        quantize_expert_shard_into(config, q, s, SHAPES.widths(W13), 0, "w4", shard, torch.bfloat16)
    with pytest.raises(ValueError, match="out of range"):
        quantize_expert_shard_into(config, q, s, SHAPES.widths(W13), SHAPES.num_experts, "w1", shard, torch.bfloat16)
    with pytest.raises(ValueError, match="shape"):
        quantize_expert_shard_into(config, q, s, SHAPES.widths(W13), 0, "w1", shard[:-1], torch.bfloat16)
    with pytest.raises(ValueError, match="does not belong"):
        q2 = torch.empty(SHAPES.num_experts, *SHAPES.shape(W2), dtype=torch.float8_e4m3fn)
        quantize_expert_shard_into(config, q2, torch.empty(SHAPES.scale_shape(config, W2)), SHAPES.widths(W2), 0, "w3",
                                   torch.zeros(SHAPES.hidden, SHAPES.intermediate), torch.bfloat16)


def test_forward_matches_a_per_token_loop():
    """Routed output = sum_k weight_k * down_e(silu(gate_e x) * up_e x), token by token in float64."""
    gen = torch.Generator().manual_seed(3)
    e, h, i, t, k = 5, 16, 8, 11, 2
    w13, w2 = torch.randn(e, 2 * i, h, generator=gen), torch.randn(e, h, i, generator=gen)
    x = torch.randn(t, h, generator=gen)
    topk_ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    topk_weights = torch.rand(t, k, generator=gen)
    out = experts_forward(x.double(), topk_weights, topk_ids, lambda ex, a: a @ w13[ex].double().T,
                          lambda ex, a: a @ w2[ex].double().T)
    for tok in range(t):
        want = torch.zeros(h, dtype=torch.float64)
        for slot in range(k):
            ex = int(topk_ids[tok, slot])
            gate, up = (w13[ex].double() @ x[tok].double()).chunk(2)
            want += topk_weights[tok, slot].double() * (w2[ex].double() @ (F.silu(gate) * up))
        assert torch.allclose(out[tok], want, rtol=1e-6, atol=1e-9)


def test_forward_dequantized_equals_float_experts_of_the_dequantized_weights():
    """With the emulated path (dequantize, matmul) the forward is the float forward of ref.dequantize(q, s)."""
    config = Fp8Config(scheme="block", block=(32, 32))
    experts = _experts()
    deq = {}
    for name, w in experts.items():
        q, s = quantize_experts(config, w, SHAPES.widths(name))
        n, kk = SHAPES.shape(name)
        deq[name] = torch.stack([ref.dequantize(q[j], ref.expand_scale(s[j], (n, kk), granularity="block", block=config.block))
                                 for j in range(SHAPES.num_experts)])
    # Seeded: unseeded, 21 of 300 draws of x failed the last check (a small output max next to a typical error)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, SHAPES.hidden, dtype=torch.float64, generator=gen)
    ids = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3], [1, 0], [3, 2]])
    wts = torch.rand(6, 2, generator=gen)
    out = experts_forward(x, wts, ids, lambda ex, a: a @ deq[W13][ex].double().T, lambda ex, a: a @ deq[W2][ex].double().T)
    assert torch.isfinite(out).all() and out.abs().max() > 0
    ref_out = experts_forward(x, wts, ids, lambda ex, a: a @ experts[W13][ex].double().T,
                              lambda ex, a: a @ experts[W2][ex].double().T)
    assert not torch.equal(out, ref_out)  # FP8 rounding is visible...
    assert (out - ref_out).abs().max() < 0.1 * ref_out.abs().max()  # ...and small
