"""A small C kernel for the CPU FP8 hot path: per-channel, per-tensor and per-block quantization of bf16 rows.

Why: on an AVX2 CPU the Inductor-compiled per-channel quantizer (`fused`) costs
about 2 ns per element, most of an FP8 sync of the bench model (0.34 of 0.53 s),
because its generated vector code carries NaN-propagating clamps, bit casts
through stack buffers and a general fp32 -> e4m3 path. Written for the case a
sync has (finite bf16 rows, unit stride), the same arithmetic is a short loop:
the amax as an integer max over the bf16 bits with the sign cleared, IEEE
division (or multiply by the reciprocal, per tensor and per block) in fp32, the
clamp, and `e4m3.from_fp32`'s rounding. With AVX2 the row loop is written by
hand, 32 elements per step (GCC's vectorization of the scalar loop spent about
twice the instructions widening, masking and repacking lanes): 0.30 instead of
0.47 ns per element per tensor on this project's AVX2 EPYC, single-threaded.
Per channel, on CPUs with FMA, the division is a multiply by the reciprocal plus
one Markstein correction by fused multiply-adds, and the next row is prefetched
while one is quantized (its amax pass then reads the cache): 0.40 instead of
0.65 ns per element.

The bits are the reference's (`rlsync.quant.reference`): the same fp32
operations in the same order, no fast-math (`-ffp-contract=off`, no reciprocal
rewrites), and any row holding a NaN or an infinity is left to the reference
(the function returns False and writes nothing the caller keeps). The proofs:
`scripts/check_e4m3_cast.py --kernel-only` runs the vector cast on every finite
fp32 pattern; `--division` compares the per-channel division with IEEE
division for every finite bf16 amax and every bf16 x with |x| <= amax (the only
inputs a row can give it). `tests/unit/test_quant_cpu_kernel.py` compares the
bits with the reference on random shapes, zeros, subnormals and +-448, and
samples both proofs; the fused quantizers stay the fallback.

With AVX-512 (F, BW, VL: this project's Xeon with AMX has them) the rows take 16 fp32 lanes: 32 bf16
per step in element order, the blend by a mask register, the codes narrowed to bytes by `vpmovdb` and the
signs or-ed in from the bf16 sign-bit mask, so no lane shuffles; the same integer and IEEE steps lane for
lane, checked by the same two proofs. A 151936 x 896 weight, one thread: per channel 49-51 instead of 67-76
ms, per tensor 55-58 instead of 70-73, per block 44-45 instead of 62 (copy floor 36-37 ms).
`RLSYNC_CPU_KERNEL_ISA=avx2` builds without AVX-512; the unit tests run both builds. Per tensor and in
`rlsync_absmax`, the next row is prefetched while one is read, as per channel.

Rows of at most 128 elements (a 256-expert layer's down projections are 32 wide) go 8 at a time: their
amaxes by hand-written 16-element steps, then one vector division for the 8 scales and one for their
reciprocals (lane for lane the scalar IEEE operations): 18-25 instead of 25-31 ns per 32-element row.
With AVX-512, rows of exactly 32 elements go 8 at a time with each row in one register, loaded once for its
amax and its codes (and the amax and divide steps forced inline): 256 x 1024 x 32 stacked down projections,
one thread, 5.2 ms instead of 7.5 (8 x 1024 x 1024: 3.3 ms). `scripts/check_e4m3_cast.py --division` also
checks whole rows of 32, 40 and 896 elements through `rlsync_channel` for every amax (`row_mismatches`).

The C source is `cpu_kernel_source.SOURCE`; this module builds, loads and calls it.

One more pass lives here because it is the same kind of loop: `copy_finite`, a
bf16 copy that also finds NaN / Inf (the sync's check of the tensors it writes
as plain copies, the vocabulary matrices above all), with streaming stores.

Built on first use with the system C compiler (`$CC`, else `cc`), the way
Inductor builds its kernels, into `$XDG_CACHE_HOME/rlsync` (else
`~/.cache/rlsync`), keyed by the source, the flags and this CPU's feature flags
(the library is built with `-march=native`). Called through ctypes, which
releases the GIL, so rows are split over `torch.get_num_threads()` threads.
`RLSYNC_CPU_KERNEL=0` turns it off.

Limitations:
1. bf16 input only, unit stride along K, CPU tensors; anything else (fp16/fp32
   weights, strided rows) goes to `fused`.
2. No compiler, or a failed build: `available()` is False, with the reason in
   `unavailable_reason()`, and `fused` runs (same bits, slower).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from rlsync.errors import ConfigError
from rlsync.quant import reference
from rlsync.quant.cpu_kernel_source import SOURCE as _SOURCE


_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-shared", "-fPIC", "-std=c11"]
# -fno-trapping-math lets GCC vectorize the loops (no FP exception is relied on; results are unchanged);
# -ffp-contract=off and no -ffast-math keep every operation the IEEE one the reference performs.
_I64, _P = ctypes.c_int64, ctypes.c_void_p


def enabled() -> bool:
    """False when `RLSYNC_CPU_KERNEL=0`."""
    return os.environ.get("RLSYNC_CPU_KERNEL", "1") != "0"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlsync"


def _flags() -> list[str]:
    """The build flags; `RLSYNC_CPU_KERNEL_ISA=avx2` builds without AVX-512 (so an AVX-512 machine can check the
    AVX2 rows too: the tests run both)."""
    isa = os.environ.get("RLSYNC_CPU_KERNEL_ISA", "native")
    if isa not in ("native", "avx2"):
        raise ConfigError(f"RLSYNC_CPU_KERNEL_ISA={isa!r}: native or avx2")
    return _FLAGS + (["-mno-avx512f"] if isa == "avx2" else [])


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded kernel library, or why there is none."""
    cc, flags = os.environ.get("CC", "cc"), _flags()
    key = hashlib.sha256("\0".join([_SOURCE, cc, *flags, platform.machine(), _cpu_flags()]).encode()).hexdigest()[:20]
    path = _cache_dir() / f"fp8_cpu_{key}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                src, out = Path(tmp) / "fp8_cpu.c", Path(tmp) / "fp8_cpu.so"
                src.write_text(_SOURCE)
                done = subprocess.run([cc, *flags, str(src), "-o", str(out)], capture_output=True, text=True, timeout=120)
                if done.returncode != 0:
                    return f"{cc} failed: {done.stderr.strip()[:300]}"
                os.replace(out, path)  # atomic: a concurrent build's library is as good as this one
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    lib.rlsync_channel.argtypes = [_P, _I64, _I64, _I64, _I64, _I64, _I64, _P, _I64, _I64, _P, _I64, _I64]
    lib.rlsync_channel.restype = ctypes.c_int
    lib.rlsync_absmax.argtypes = [_P, _I64, _I64, _I64, _I64]
    lib.rlsync_absmax.restype = ctypes.c_int
    lib.rlsync_tensor.argtypes = [_P, _I64, _I64, _I64, _I64, _I64, _I64, _P, _I64, _I64, _P]
    lib.rlsync_tensor.restype = None
    lib.rlsync_block.argtypes = [_P, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _P, _I64, _P, _I64, _P]
    lib.rlsync_block.restype = ctypes.c_int
    lib.rlsync_copy_absmax.argtypes = [_P, _P, _I64]
    lib.rlsync_copy_absmax.restype = ctypes.c_int
    lib.rlsync_copy_absmax_rows.argtypes = [_P, _P, _I64, _I64, _I64, _I64]
    lib.rlsync_copy_absmax_rows.restype = ctypes.c_int
    lib.rlsync_cast.argtypes = [_P, _P, _I64]
    lib.rlsync_cast.restype = None
    lib.rlsync_division_mismatches.argtypes = [_I64, _I64, _P]
    lib.rlsync_division_mismatches.restype = ctypes.c_int64
    lib.rlsync_row_mismatches.argtypes = [_I64, _I64, _I64, _P]
    lib.rlsync_row_mismatches.restype = ctypes.c_int64
    return lib


def available() -> bool:
    return enabled() and not isinstance(_library(), str)


def unavailable_reason() -> str | None:
    if not enabled():
        return "RLSYNC_CPU_KERNEL=0"
    lib = _library()
    return lib if isinstance(lib, str) else None


def _fits(w: torch.Tensor, *outs: torch.Tensor) -> bool:
    return (w.dtype == torch.bfloat16 and w.dim() == 2 and w.device.type == "cpu" and w.stride(1) == 1 and w.shape[0] > 0
            and all(o.device.type == "cpu" and (o.dim() < 2 or o.stride(-1) == 1) for o in outs) and available())


@functools.cache
def _pool(num_threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(num_threads, thread_name_prefix="rlsync-fp8")


def _split(n: int, fn, grain: int = 64) -> list:
    """Run `fn(r0, r1)` over row ranges, one per torch thread (ctypes releases the GIL)."""
    parts = max(1, min(torch.get_num_threads(), n // grain))
    if parts == 1:
        return [fn(0, n)]
    bounds = [n * i // parts for i in range(parts + 1)]
    return list(_pool(parts).map(lambda i: fn(bounds[i], bounds[i + 1]), range(parts)))


def channel_into(w_NK: torch.Tensor, q_NK: torch.Tensor, scale_N1: torch.Tensor) -> bool:
    """`reference.fp8_per_channel(w_NK)` written into `q_NK` (e4m3) and `scale_N1` (fp32); False: not done here
    (not a bf16 CPU weight with unit stride, no kernel, or a NaN / infinity: the caller runs the reference)."""
    if not _fits(w_NK, q_NK) or q_NK.dtype != torch.float8_e4m3fn or scale_N1.dtype != torch.float32:
        return False
    return _channel(w_NK[None], q_NK[None], scale_N1[None])


def _channel(w_SNK: torch.Tensor, q_SNK: torch.Tensor, scale_SN1: torch.Tensor) -> bool:
    (num, n, k), lib = w_SNK.shape, _library()
    wp, qp, sp = w_SNK.data_ptr(), q_SNK.data_ptr(), scale_SN1.data_ptr()
    (ws, wr, _), (qs, qr, _), (ss, sr) = w_SNK.stride(), q_SNK.stride(), scale_SN1.stride()[:2]
    return not any(_split(num * n, lambda r0, r1: lib.rlsync_channel(wp, r0, r1, n, k, ws, wr, qp, qs, qr, sp, ss, sr)))


def abs_max(w: torch.Tensor) -> torch.Tensor | None:
    """max |w| (0-d, w's dtype), as `reference.abs_max`; None when not done here (as `channel_into`)."""
    if not _fits(w):
        return None
    n, k = w.shape
    lib, wp, ws = _library(), w.data_ptr(), w.stride(0)
    found = _split(n, lambda r0, r1: lib.rlsync_absmax(wp, r0, r1, k, ws))
    if 0xFFFF in found:
        return None
    return torch.tensor([max(found)], dtype=torch.int16).view(torch.bfloat16)[0].clone()


def _blocks(t: torch.Tensor, flat: bool = True) -> tuple[int, int, int, int, int] | None:
    """`t` as S blocks of N rows of K unit-stride elements: (S, N, K, block stride, row stride), or None.

    Contiguous tensors are one block of rows of 4096 (or one row) when `flat`; 2-D and 3-D views with unit-stride
    rows (an MoE layer's gate or up experts, stacked views into the fused tensor) are taken as they lie."""
    if flat and t.is_contiguous():
        n = t.numel()
        return (1, n // 4096, 4096, 0, 4096) if n % 4096 == 0 else (1, 1, n, 0, n)
    if t.dim() not in (2, 3) or t.stride(-1) != 1:
        return None
    if t.dim() == 2:
        return 1, t.shape[0], t.shape[1], 0, t.stride(0)
    return t.shape[0], t.shape[1], t.shape[2], t.stride(0), t.stride(1)


def finite(t: torch.Tensor) -> bool | None:
    """Whether bf16 CPU `t` holds no NaN and no infinity (one integer max pass); None: not decided here (another
    dtype or device, or a layout `_blocks` does not take)."""
    if t.dtype != torch.bfloat16 or t.device.type != "cpu" or t.numel() == 0 or not available():
        return None
    blocks = _blocks(t)
    if blocks is None:
        return None
    num, n, k, bs, rs = blocks
    lib, wp = _library(), t.data_ptr()
    if num == 1:
        return 0xFFFF not in _split(n, lambda r0, r1: lib.rlsync_absmax(wp, r0, r1, k, rs))
    return all(lib.rlsync_absmax(wp + 2 * s * bs, 0, n, k, rs) != 0xFFFF for s in range(num))


def copy_finite(dst: torch.Tensor, src: torch.Tensor) -> bool | None:
    """`dst.copy_(src)` and whether `src` holds no NaN and no infinity, in one pass (the copy reads every element
    anyway); None: nothing done (not same-shape bf16 CPU tensors in layouts `_blocks` takes, overlapping, or no
    kernel).

    Measured for a 64 MiB bf16 tensor, one thread: 8.5 ms against 11.1 ms for `copy_` plus 7.8 ms for `finite`."""
    if (src.dtype != torch.bfloat16 or dst.dtype != torch.bfloat16 or src.device.type != "cpu"
            or dst.device.type != "cpu" or src.shape != dst.shape or src.numel() == 0 or not available()):
        return None
    if _spans_overlap(src, dst):
        return None  # overlapping storage: left to torch
    lib, sp, dp = _library(), src.data_ptr(), dst.data_ptr()
    if src.is_contiguous() and dst.is_contiguous():
        n = src.numel()
        step = 1 << 16  # elements per piece handed to a thread
        found = _split(-(-n // step), lambda c0, c1: lib.rlsync_copy_absmax(sp + 2 * c0 * step, dp + 2 * c0 * step,
                                                                            min(n, c1 * step) - c0 * step), grain=16)
        return 0xFFFF not in found
    a, b = _blocks(src, flat=False), _blocks(dst, flat=False)
    if a is None or b is None or a[:3] != b[:3] or src.dim() != dst.dim():
        return None
    (num, n, k, sbs, srs), (_, _, _, dbs, drs) = a, b
    return all([lib.rlsync_copy_absmax_rows(sp + 2 * s * sbs, dp + 2 * s * dbs, n, k, srs, drs) != 0xFFFF
                for s in range(num)])  # a list: every block is copied, a non-finite one included


def _spans_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the storage spans of `a` and `b` (first to last element touched) overlap."""
    def span(t: torch.Tensor) -> tuple[int, int]:
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
        return t.data_ptr(), t.data_ptr() + 2 * (last + 1)

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def tensor_into(w: torch.Tensor, scale_1: torch.Tensor, q: torch.Tensor) -> bool:
    """`reference.quantize_with_tensor_scale(w, scale_1)` written into `q`; False when not done here.

    Only for finite `w` (the caller took its amax through `abs_max`, which refuses NaN and infinity)."""
    if not _fits(w, q) or q.dtype != torch.float8_e4m3fn:
        return False
    _tensor(w[None], q[None], scale_1.reshape(1))
    return True


def _tensor(w_SNK: torch.Tensor, q_SNK: torch.Tensor, scale_S: torch.Tensor) -> None:
    inv = scale_S.to(torch.float32).reciprocal().contiguous()  # the reference's fp32 reciprocals, exactly
    (num, n, k), lib = w_SNK.shape, _library()
    wp, qp, ip = w_SNK.data_ptr(), q_SNK.data_ptr(), inv.data_ptr()
    (ws, wr, _), (qs, qr, _) = w_SNK.stride(), q_SNK.stride()
    _split(num * n, lambda r0, r1: lib.rlsync_tensor(wp, r0, r1, n, k, ws, wr, qp, qs, qr, ip))


def block_into(w_NK: torch.Tensor, block: tuple[int, int], q_NK: torch.Tensor, scale_nk: torch.Tensor) -> bool:
    """`reference.fp8_per_block(w_NK, block)` written into `q_NK` and `scale_nk` (ceil(N/bn), ceil(K/bk));
    False when not done here (as `channel_into`)."""
    if (not _fits(w_NK, q_NK, scale_nk) or q_NK.dtype != torch.float8_e4m3fn or scale_nk.dtype != torch.float32
            or scale_nk.dim() != 2):
        return False
    (n, k), (bn, bk) = w_NK.shape, block
    nb, kb = -(-n // bn), -(-k // bk)
    if tuple(scale_nk.shape) != (nb, kb):
        return False
    lib = _library()
    wp, qp, sp, ws, qs, ss = w_NK.data_ptr(), q_NK.data_ptr(), scale_nk.data_ptr(), w_NK.stride(0), q_NK.stride(0), scale_nk.stride(0)

    def run(b0: int, b1: int) -> int:
        scratch = torch.empty(kb, dtype=torch.float32)  # per thread: the blocks' reciprocals
        return lib.rlsync_block(wp, b0, b1, n, k, ws, bn, bk, qp, qs, sp, ss, scratch.data_ptr())

    return not any(_split(nb, run, grain=1))


def cast_clamped(x: torch.Tensor) -> torch.Tensor:
    """The kernel's cast of finite fp32 `x` (clamp to +-448, then e4m3), for checking it; needs `available()`."""
    lib = _library()
    if isinstance(lib, str) or x.dtype != torch.float32 or x.device.type != "cpu":
        raise RuntimeError(f"cast_clamped needs the kernel and a CPU float32 tensor ({lib if isinstance(lib, str) else x.dtype})")
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.uint8)
    lib.rlsync_cast(x.data_ptr(), out.data_ptr(), x.numel())
    return out.view(torch.float8_e4m3fn)


def division_mismatches(a0: int = 0, a1: int = 0x7F80) -> tuple[int, tuple[int, int] | None]:
    """The per-channel rows' division against IEEE division, exhaustively: every amax whose bf16 bits are in
    [a0, a1) (default: every finite one) with every bf16 x, |x| <= amax. Returns (differing pairs, the first as
    (amax bits, x bits) or None); needs `available()`. Used by scripts/check_e4m3_cast.py --division."""
    return _proof("rlsync_division_mismatches", a0, a1)


def row_mismatches(k: int, a0: int = 0, a1: int = 0x7F80) -> tuple[int, tuple[int, int] | None]:
    """`rlsync_channel` on whole rows of `k` elements against the scalar reference, exhaustively: for every amax
    whose bf16 bits are in [a0, a1), rows holding that amax and every bf16 x with |x| <= amax (both signs); the
    scale and every code. Checks what `division_mismatches` does not reach: the 32-element rows' register path
    (k = 32) and the 8-row scale division (k <= 128). Returns (differing elements, the first as (amax bits,
    x bits) or None); needs `available()`. Used by scripts/check_e4m3_cast.py --division."""
    return _proof("rlsync_row_mismatches", a0, a1, k)


def _proof(name: str, a0: int, a1: int, *extra: int) -> tuple[int, tuple[int, int] | None]:
    """Run the C proof `name` over amax bits [a0, a1), split across the kernel's threads: (count, first mismatch)."""
    lib = _library()
    if isinstance(lib, str):
        raise RuntimeError(f"{name} needs the kernel ({lib})")
    fn = getattr(lib, name)

    def run(lo: int, hi: int) -> tuple[int, tuple[int, int] | None]:
        bad = (ctypes.c_int64 * 2)()
        count = fn(a0 + lo, a0 + hi, *extra, ctypes.addressof(bad))
        if count < 0:
            raise MemoryError(f"{name}: out of memory")
        return count, (bad[0], bad[1]) if count else None

    parts = _split(a1 - a0, run, grain=256)
    return sum(c for c, _ in parts), next((b for _, b in parts if b is not None), None)


def stacked_into(scheme: str, w_SNK: torch.Tensor, q_SNK: torch.Tensor, scale: torch.Tensor) -> bool:
    """`reference.stacked_fp8_into` for the channel and tensor schemes, all S weights in one kernel call; False when
    not done here (then the caller runs the fused function, which rewrites every output)."""
    if (scheme not in ("channel", "tensor") or w_SNK.dim() != 3 or len(w_SNK) == 0 or not _fits(w_SNK[0], q_SNK[0])
            or q_SNK.dtype != torch.float8_e4m3fn or scale.dtype != torch.float32):
        return False
    if scheme == "channel":
        return _channel(w_SNK, q_SNK, scale)
    lib, (num, n, k) = _library(), w_SNK.shape
    wp, (ws, wr, _) = w_SNK.data_ptr(), w_SNK.stride()
    maxima = [lib.rlsync_absmax(wp + s * ws * 2, 0, n, k, wr) for s in range(num)]  # bf16: 2 bytes per element
    if 0xFFFF in maxima:
        return False
    amaxes = torch.tensor(maxima, dtype=torch.int16).view(torch.bfloat16)
    fp8_max = torch.tensor(reference.FP8_MAX, dtype=torch.float32)
    s_S1 = (amaxes.reshape(-1, 1).to(torch.float32) / fp8_max).clamp_min(reference._TINY)  # the reference's ops
    _tensor(w_SNK, q_SNK, s_S1.reshape(-1))
    scale.copy_(s_S1)
    return True
