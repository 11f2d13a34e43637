"""FP8 quantizers on a GPU against the device's copy bandwidth, and `torch._scaled_mm` vs emulated.

    python benchmarks/gpu_quant.py                         # CUDA: default shapes, all schemes
    python benchmarks/gpu_quant.py --json gpu_quant.json
    python benchmarks/gpu_quant.py --device cpu --shapes 512x256   # dry run of the code paths (no GPU figures)

Part 1, quantizer throughput. For each weight shape and scheme (`tensor`,
`channel`, `block` 128x128) we time rlsync's reference quantizer
(`rlsync.quant.reference`) and the quantize-on-arrival path
(`fp8_linear.quantize_shard_into`, writing into existing kernel tensors) on a
bf16 weight already on the device. The bytes each must move are: read 2 B and
write 1 B per element, plus the scales. The floor is one `torch` copy moving
the same number of bytes (a copy of X bytes reads X and writes X), measured on
the same device in the same run; we report GB/s and the multiple of that floor.
Times are medians over `--iters` runs, CUDA-synchronized, after a warmup.

Part 2, kernel correctness. For tensor (one and three shards) and channel
scales, the `torch_scaled_mm` kernel (dynamic FP8 activations) against the
`emulated` kernel (dequantize + bf16 matmul) on the same stored weights: SQNR
of the outputs (the only difference is the FP8 rounding of the activations,
so about 29 dB is expected; the check fails below 25 dB) and the max relative
error. Needs a GPU with FP8 matmul (SM89+); otherwise the kernel's reason is
printed.

Limitations:
1. Reference quantizers are plain torch (several kernels each), not fused: the
   multiple of the copy floor is what fusing could still win.
2. Without CUDA it exits with a message unless `--device cpu` asks for a dry
   run; CPU figures are not GPU figures.
3. No vLLM needed; vLLM's own FP8 kernels are not timed here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from rlsync.quant import reference as ref
from rlsync.quant.fp8_linear import Fp8Config, quantize_full, quantize_shard_into
from rlsync.quant.kernels import KERNELS, LinearDescriptor, check_kernel
from rlsync.quant.layout import QuantizedTensor

SCHEMES = ("tensor", "channel", "block")
DEFAULT_SHAPES = ("4096x4096", "8192x8192", "28672x8192", "8192x28672")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    fn()  # warmup (allocator, kernel caches)
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_floor_gbps(device: torch.device, num_bytes: int, iters: int) -> float:
    """Bytes read + written per second by one flat copy of `num_bytes`."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, iters)
    return 2 * num_bytes / seconds / 1e9


def bench_quantizers(device: torch.device, shapes: list[tuple[int, int]], iters: int) -> list[dict]:
    rows = []
    for n, k in shapes:
        weight = (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16)
        floor = copy_floor_gbps(device, n * k * 3 // 2, iters)  # copy moving 3 B per element (read 2 + write 1)
        for scheme in SCHEMES:
            cfg = Fp8Config(scheme=scheme)
            widths = (n,)
            q, scale = quantize_full(cfg, weight, widths)
            moved = n * k * 3 + 2 * scale.numel() * 4
            ref_s = median_seconds(lambda: quantize_full(cfg, weight, widths), device, iters)
            arrival_s = median_seconds(
                lambda: quantize_shard_into(cfg, q, scale, widths, 0, weight, torch.bfloat16), device, iters)
            want_q, want_s = quantize_full(cfg, weight, widths)
            exact = torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(scale, want_s)
            for path, seconds in (("reference", ref_s), ("arrival", arrival_s)):
                gbps = moved / seconds / 1e9
                rows.append({"shape": f"{n}x{k}", "scheme": scheme, "path": path, "seconds": seconds,
                             "gbps": gbps, "copy_gbps": floor, "x_floor": floor / gbps, "bit_exact": exact})
                print(f"{n:>6}x{k:<6} {scheme:<8} {path:<9} {seconds * 1e3:8.3f} ms  {gbps:7.1f} GB/s"
                      f"  copy {floor:7.1f} GB/s  {floor / gbps:5.2f}x floor  bit-exact {exact}")
        del weight
    return rows


def check_scaled_mm(device: torch.device, n: int, k: int, m: int) -> list[dict]:
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(n, k, device=device, generator=gen) * 0.02).to(torch.bfloat16)
    x = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
    for scheme, widths in (("tensor", (n,)), ("tensor", (n // 2, n // 4, n // 4)), ("channel", (n,))):
        cfg = Fp8Config(scheme=scheme)
        q, scale = quantize_full(cfg, weight, widths)
        stored = QuantizedTensor(data=q, scale=scale, layout=cfg.layout(), shape=(n, k), shard_widths=widths)
        desc = LinearDescriptor(weight_layout=cfg.layout(), shape=(n, k), shard_widths=widths, device=device.type)
        ok, reason = check_kernel(KERNELS["torch_scaled_mm"], desc)
        label = f"{scheme} ({len(widths)} shard{'s' if len(widths) > 1 else ''})"
        if not ok:
            print(f"torch_scaled_mm {label}: not run here: {reason}")
            rows.append({"scheme": label, "ran": False, "reason": reason})
            continue
        emulated, smm = KERNELS["emulated"](desc), KERNELS["torch_scaled_mm"](desc)
        a = emulated.apply(emulated.prep_weights_for_execution(stored), x, None).float()
        b = smm.apply(smm.prep_weights_for_execution(stored), x, None).float()
        sqnr = ref.sqnr_db(a, b)
        rel = float((a - b).abs().max() / a.abs().max())
        passed = sqnr > 25.0
        print(f"torch_scaled_mm vs emulated, {label}, {m}x{k} @ {k}x{n}: SQNR {sqnr:.1f} dB, "
              f"max rel err {rel:.4f} -> {'ok' if passed else 'FAIL (< 25 dB)'}")
        rows.append({"scheme": label, "ran": True, "sqnr_db": sqnr, "max_rel_err": rel, "ok": passed})
    return rows


def parse_shape(text: str) -> tuple[int, int]:
    n, k = text.lower().split("x")
    return int(n), int(k)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="weight shapes NxK")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=256, help="rows of x in the kernel check")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_quant: no CUDA device here. Run on a GPU machine, or pass --device cpu for a dry run "
              "of the code paths (CPU numbers are not GPU figures).", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    print(f"device: {name}, torch {torch.__version__}")
    shapes = [parse_shape(s) for s in args.shapes]
    results = {"device": name, "quantizers": bench_quantizers(device, shapes, args.iters),
               "scaled_mm_vs_emulated": check_scaled_mm(device, *shapes[0], args.tokens)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    failed = [r for r in results["scaled_mm_vs_emulated"] if r.get("ran") and not r["ok"]]
    failed += [r for r in results["quantizers"] if not r["bit_exact"]]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
