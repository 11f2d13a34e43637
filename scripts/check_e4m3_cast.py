"""Check rlsync's fp32 -> float8_e4m3fn casts against torch's for every fp32 bit pattern.

`rlsync.quant.e4m3.from_fp32` (eager and compiled) on every pattern; the C
kernel's clamped cast (`rlsync.quant.cpu_kernel`, finite inputs only) against
torch's `clamp(-448, 448)` then cast, on every finite pattern.

    .venv/bin/python scripts/check_e4m3_cast.py              # all 2^32 patterns, eager and compiled (a few minutes)
    .venv/bin/python scripts/check_e4m3_cast.py --stride 97  # every 97th pattern (seconds)
    .venv/bin/python scripts/check_e4m3_cast.py --division   # the kernel's per-channel division and rows (under a minute)

`--division` checks the C kernel's per-channel rows, which divide without the
divider (a reciprocal and one fused-multiply-add correction on CPUs with FMA):
every finite bf16 amax, every bf16 x with |x| <= amax, both signs (about 10^9
pairs), e4m3 codes against IEEE division's then the same cast; then whole rows
of 32, 40 and 896 elements through `rlsync_channel` (each row holding its amax),
scales and codes against the scalar reference (`cpu_kernel.row_mismatches`).

Exits 1 naming the first differing input. The unit test (`tests/unit/test_quant_e4m3.py`)
checks a strided sample and every rounding boundary; this script is the whole proof.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from rlsync.quant import cpu_kernel
from rlsync.quant.e4m3 import from_fp32

CHUNK = 1 << 24


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stride", type=int, default=1, help="check every N-th bit pattern (default: all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--kernel-only", action="store_true", help="check only the C kernel's cast")
    p.add_argument("--division", action="store_true", help="check only the C kernel's per-channel division")
    args = p.parse_args(argv)
    if args.division:
        return check_division()
    compiled = torch.compile(from_fp32, dynamic=True)
    start, checked = time.perf_counter(), 0
    step = CHUNK * args.stride
    for lo in range(-(1 << 31), 1 << 31, step):
        ints = torch.arange(lo, min(lo + step, 1 << 31), args.stride, dtype=torch.int64, device=args.device)
        x = ints.to(torch.int32).view(torch.float32)
        want = x.to(torch.float8_e4m3fn).view(torch.uint8)
        finite = torch.isfinite(x)
        clamped_want = x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
        checks = [] if args.kernel_only else [("eager", from_fp32, want), ("compiled", compiled, want)]
        if cpu_kernel.available():
            checks.append(("C kernel (finite)", lambda v: torch.where(finite, cpu_kernel.cast_clamped(v).view(torch.uint8),
                                                                          clamped_want).view(torch.float8_e4m3fn), clamped_want))
        for name, fn, want in checks:
            have = fn(x).view(torch.uint8)
            bad = (have != want).nonzero()
            if len(bad):
                i = int(bad[0])
                print(f"{name}: input bits {int(ints[i]) & 0xFFFFFFFF:#010x} ({x[i].item()!r}): "
                      f"got {int(have[i]):#04x}, torch gives {int(want[i]):#04x}", file=sys.stderr)
                return 1
        checked += len(ints)
    kernel = cpu_kernel.unavailable_reason() or "the finite ones identical to torch's clamp then cast"
    checked_here = f"C kernel: {kernel}" if args.kernel_only else f"from_fp32 identical to torch's cast (eager and compiled); C kernel: {kernel}"
    print(f"e4m3 cast: {checked} fp32 bit patterns; {checked_here}; {time.perf_counter() - start:.0f} s")
    return 0


def check_division() -> int:
    if not cpu_kernel.available():
        print(f"no C kernel here: {cpu_kernel.unavailable_reason()}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    count, first = cpu_kernel.division_mismatches()
    if count:
        print(f"C kernel division: {count} (amax, x) pairs differ, first amax bits {first[0]:#06x}, x bits {first[1]:#06x}",
              file=sys.stderr)
        return 1
    print(f"C kernel division: every finite bf16 amax, every bf16 x with |x| <= amax: codes identical to IEEE "
          f"division's; {time.perf_counter() - start:.0f} s")
    for k in ROW_WIDTHS:
        start = time.perf_counter()
        count, first = cpu_kernel.row_mismatches(k)
        if count:
            print(f"C kernel rows of {k}: {count} elements differ, first amax bits {first[0]:#06x}, x bits {first[1]:#06x}",
                  file=sys.stderr)
            return 1
        print(f"C kernel rows of {k}: every finite bf16 amax with every bf16 x, |x| <= amax: scales and codes identical "
              f"to the reference's; {time.perf_counter() - start:.0f} s")
    return 0


ROW_WIDTHS = (32, 40, 896)
"""Whole per-channel rows checked by `--division`: 32 (the register path of 256-expert down projections), 40
(the 8-row scale division with a scalar tail), 896 (long rows)."""


if __name__ == "__main__":
    sys.exit(main())
