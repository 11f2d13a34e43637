"""The C kernel's per-channel / per-tensor FP8 has the reference's bits, and leaves what it cannot do to it."""

import pytest
import torch

from rlsync.errors import ConfigError
from rlsync.quant import cpu_kernel, reference


@pytest.fixture(autouse=True, params=["native", "avx2"])
def isa(request, monkeypatch):
    """Every test on the native build and on the AVX2 build: on a CPU with AVX-512 (its own row loops) both are
    checked; on an AVX2 CPU the two builds are the same code."""
    monkeypatch.setenv("RLSYNC_CPU_KERNEL_ISA", request.param)
    cpu_kernel._library.cache_clear()
    yield request.param
    cpu_kernel._library.cache_clear()


def test_an_unknown_isa_is_refused(monkeypatch):
    monkeypatch.setenv("RLSYNC_CPU_KERNEL_ISA", "avx9")
    with pytest.raises(ConfigError, match="native or avx2"):
        cpu_kernel._flags()


def test_the_kernel_builds_here():
    """This project's machines have a C compiler (Inductor needs one too); a user's without one runs `fused`."""
    assert cpu_kernel.available(), cpu_kernel.unavailable_reason()

SHAPES = [(2816, 1024), (257, 129), (7, 5), (1, 1), (64, 4096), (300, 32), (45, 100), (20, 8), (64, 128)]
"""Long rows; rows of at most 128 (8 rows at a time: the 256-expert down projections are 32 wide), with and
without a whole number of 8 rows, 16-element steps or 32-element steps."""


def bits(t):
    return t.contiguous().view(torch.uint8 if t.element_size() == 1 else torch.int32)


def weight(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 0.1
    w[0, 0] = -0.0
    if shape[0] > 2:
        w[2] = 0.0  # an all-zero row: the clamped minimum scale
    if shape[0] > 3:
        w[3] = torch.randn(shape[1], generator=g) * 1e-39  # bf16 subnormals: the subnormal e4m3 path
    if shape[0] > 4:
        w[4, -1] = 3e38  # huge but finite
    return w.to(torch.bfloat16)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_channel_and_tensor_bits_equal_the_reference(shape, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = weight(shape, seed=sum(shape))
        big = torch.empty(shape[0] + 3, shape[1], dtype=torch.float8_e4m3fn)  # rows of a larger kernel tensor
        scale = torch.full((shape[0] + 3, 1), float("nan"))
        assert cpu_kernel.channel_into(w, big[2:2 + shape[0]], scale[2:2 + shape[0]])
        qr, sr = reference.fp8_per_channel(w)
        assert torch.equal(bits(big[2:2 + shape[0]]), bits(qr)) and torch.equal(scale[2:2 + shape[0]], sr)

        amax = cpu_kernel.abs_max(w)
        assert amax is not None and torch.equal(amax, reference.abs_max(w))
        s = reference.per_tensor_scale(w)
        q = torch.empty(shape, dtype=torch.float8_e4m3fn)
        assert cpu_kernel.tensor_into(w, s, q)
        assert torch.equal(bits(q), bits(reference.quantize_with_tensor_scale(w, s)))
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rows_are_left_to_the_reference(bad):
    w = weight((16, 32), seed=1)
    w[9, 3] = bad
    q, s = torch.empty(16, 32, dtype=torch.float8_e4m3fn), torch.empty(16, 1)
    assert not cpu_kernel.channel_into(w, q, s)
    assert cpu_kernel.abs_max(w) is None


def test_other_inputs_are_refused_not_guessed():
    w = weight((16, 32), seed=2)
    q, s = torch.empty(16, 32, dtype=torch.float8_e4m3fn), torch.empty(16, 1)
    assert not cpu_kernel.channel_into(w.float(), q, s)  # fp32 weights: the fused path
    assert not cpu_kernel.channel_into(w.t().contiguous().t(), q, s)  # column-major
    assert not cpu_kernel.tensor_into(w.half(), torch.ones(1), q)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("RLSYNC_CPU_KERNEL", "0")
    assert not cpu_kernel.available() and cpu_kernel.unavailable_reason() == "RLSYNC_CPU_KERNEL=0"
    w = weight((8, 8), seed=3)
    assert not cpu_kernel.channel_into(w, torch.empty(8, 8, dtype=torch.float8_e4m3fn), torch.empty(8, 1))


@pytest.mark.parametrize("scheme, scale_shape", [("channel", (5, 40, 1)), ("tensor", (5, 1))])
@pytest.mark.parametrize("layout", ["contiguous", "half-of-fused"])
def test_stacked_weights_equal_the_reference(scheme, scale_shape, layout):
    """One kernel call for every expert: a contiguous stack, or the gate half of a fused (E, 2N, K) weight written
    into rows of a fused FP8 tensor (how transformers' experts and vLLM's w13 lie)."""
    if layout == "contiguous":
        w = (torch.randn(5, 40, 24) * 0.02).to(torch.bfloat16)
        q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    else:
        w = (torch.randn(5, 80, 24) * 0.02).to(torch.bfloat16)[:, 40:]
        q = torch.empty(5, 80, 24, dtype=torch.float8_e4m3fn)[:, :40]
    w[2, 3] *= 100
    w[4] = 0.0
    s = torch.empty(scale_shape)
    qr, sr = torch.empty(w.shape, dtype=torch.float8_e4m3fn), torch.empty_like(s)
    assert cpu_kernel.stacked_into(scheme, w, q, s)
    reference.stacked_fp8_into(scheme, w, qr, sr)
    assert torch.equal(bits(q), bits(qr)) and torch.equal(s, sr)
    assert not cpu_kernel.stacked_into("block", w, q, s)


def test_cast_on_a_sample_of_every_finite_fp32_pattern():
    """The kernel's clamped cast; scripts/check_e4m3_cast.py --kernel-only checks every finite pattern."""
    ints = torch.arange(-(1 << 31), 1 << 31, 4099, dtype=torch.int64)
    x = ints.to(torch.int32).view(torch.float32)
    x = x[torch.isfinite(x)]
    edges = torch.tensor([448.0, 447.99, 448.01, 464.0, 2.0**-6, 2.0**-9, 2.0**-10, 1.5 * 2.0**-9, 0.0, -0.0, 1e-45, 3e38])
    x = torch.cat([x, edges, -edges])
    want = x.clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(bits(cpu_kernel.cast_clamped(x)), bits(want))


@pytest.mark.parametrize("shape, block", [((2816, 1024), (128, 128)), ((300, 200), (128, 128)), ((7, 5), (4, 2)),
                                          ((256, 384), (128, 128))])
@pytest.mark.parametrize("threads", [1, 2])
def test_block_bits_equal_the_reference(shape, block, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = weight(shape, seed=len(shape) + shape[0])
        nb, kb = -(-shape[0] // block[0]), -(-shape[1] // block[1])
        q = torch.empty(shape, dtype=torch.float8_e4m3fn)
        s = torch.full((nb + 1, kb), float("nan"))
        assert cpu_kernel.block_into(w, block, q, s[1:])
        qr, sr = reference.fp8_per_block(w, block)
        assert torch.equal(bits(q), bits(qr)) and torch.equal(s[1:], sr)
        w[-1, -1] = float("nan")
        assert not cpu_kernel.block_into(w, block, q, s[1:])
        assert not cpu_kernel.block_into(w, block, q, s[:-1, :-1] if kb > 1 else s[:, :0])  # wrong scale shape
    finally:
        torch.set_num_threads(old)


def test_finite_check():
    w = weight((64, 4096), seed=7)
    assert cpu_kernel.finite(w) is True and cpu_kernel.finite(w[0]) is True and cpu_kernel.finite(w[:, :3].flatten()) is True
    for bad in (float("nan"), float("inf"), -float("inf")):
        v = w.clone()
        v[40, 17] = bad
        assert cpu_kernel.finite(v) is False
        assert cpu_kernel.finite(v[40]) is False
    assert cpu_kernel.finite(w.float()) is None and cpu_kernel.finite(w.t()) is None  # not decided here


@pytest.mark.parametrize("numel", [1, 31, 32 * 1024 + 17, 3 * (1 << 16) + 5])
def test_copy_finite_copies_every_element_and_finds_each_non_finite_one(numel):
    """Every length class (shorter than a vector, a vector tail, several thread pieces with a ragged end) and
    every position kind (head before the aligned stores, vector body, tail)."""
    src = weight((1, numel), seed=3).to(torch.bfloat16).reshape(-1)
    dst = torch.empty(numel + 8, dtype=torch.bfloat16)[3:numel + 3]  # a destination not 32-byte aligned
    assert cpu_kernel.copy_finite(dst, src) is True and torch.equal(dst.view(torch.int16), src.view(torch.int16))
    for where in {0, numel // 2, numel - 1}:
        for bad in (float("nan"), float("inf"), -float("inf")):
            v = src.clone()
            v[where] = bad
            out = torch.zeros_like(v)
            assert cpu_kernel.copy_finite(out, v) is False, (where, bad)
            assert torch.equal(out.view(torch.int16), v.view(torch.int16))  # copied all the same


def test_strided_expert_views_are_checked_and_copied_block_by_block():
    """An MoE layer's gate experts: a view into the fused gate_up (every other block of rows), 3-D, unit-stride rows;
    and a 2-D row-strided slice."""
    fused = weight((4 * 2 * 8, 64), seed=9).reshape(4, 16, 64)
    gate, up = fused[:, :8], fused[:, 8:]
    assert cpu_kernel.finite(gate) is True and cpu_kernel.finite(fused[1, :, :32]) is True
    out = torch.zeros(4, 8, 64, dtype=torch.bfloat16)
    assert cpu_kernel.copy_finite(out, gate) is True and torch.equal(out.view(torch.int16), gate.view(torch.int16))
    wide = torch.zeros(4, 16, 64, dtype=torch.bfloat16)
    assert cpu_kernel.copy_finite(wide[:, 8:], up) is True and torch.equal(wide[:, 8:], up) and not wide[:, :8].any()
    for where in ((0, 0, 0), (3, 7, 63), (2, 4, 17)):
        bad = fused.clone()
        bad[:, :8][where] = float("nan")
        assert cpu_kernel.finite(bad[:, :8]) is False and cpu_kernel.finite(bad[:, 8:]) is True
        out.zero_()
        assert cpu_kernel.copy_finite(out, bad[:, :8]) is False
        assert torch.equal(out.view(torch.int16), bad[:, :8].view(torch.int16))  # every block copied all the same


def test_copy_finite_leaves_what_it_cannot_do_to_torch():
    w = weight((64, 256), seed=5)
    assert cpu_kernel.copy_finite(torch.empty(64, 256), w) is None  # another dtype
    assert cpu_kernel.copy_finite(torch.empty_like(w), w.t()) is None  # not contiguous
    assert cpu_kernel.copy_finite(torch.empty(32, 512, dtype=torch.bfloat16), w) is None  # another shape
    assert cpu_kernel.copy_finite(w, w) is None  # overlapping storage
    assert cpu_kernel.copy_finite(w[:, :128], w[:, 64:192]) is None  # overlapping strided views
    assert cpu_kernel.finite(w[:, ::2]) is None and cpu_kernel.copy_finite(torch.empty(64, 128, dtype=torch.bfloat16), w[:, ::2]) is None


def test_division_without_the_divider_on_a_sample_of_every_amax():
    """The per-channel rows divide by a reciprocal and one fused-multiply-add correction where the CPU has FMA;
    scripts/check_e4m3_cast.py --division checks every (amax, x) pair, this a strided sample of the amaxes plus
    the ends (zero, the clamped minimum scale, the largest finite bf16)."""
    assert cpu_kernel.division_mismatches(0, 64) == (0, None)  # zero and the smallest subnormal amaxes
    for a in list(range(64, 0x7F80, 251)) + [0x3680, 0x3700, 0x7F70, 0x7F7F]:
        assert cpu_kernel.division_mismatches(a, a + 1) == (0, None), hex(a)


@pytest.mark.parametrize("k", [32, 40, 896])
def test_whole_rows_on_a_sample_of_every_amax(k):
    """`rlsync_channel` on rows of k elements holding their amax and every |x| <= amax, against the scalar reference:
    32 is the register path of 256-expert down projections (8 rows at a time), 40 the 8-row scale division,
    896 long rows. scripts/check_e4m3_cast.py --division checks every amax; this a strided sample plus the ends."""
    assert cpu_kernel.row_mismatches(k, 0, 64) == (0, None)
    for a in list(range(64, 0x7F80, 1021)) + [0x3680, 0x3700, 0x7F70, 0x7F7F]:
        assert cpu_kernel.row_mismatches(k, a, a + 1) == (0, None), hex(a)
