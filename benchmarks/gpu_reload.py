"""A full rlsync reload on a GPU: time against the device's copy bandwidth, memory against the model.

    python benchmarks/gpu_reload.py                       # BENCH_SPEC shape (~250M), bf16 + FP8 tensor/channel/block
    python benchmarks/gpu_reload.py --shape 1.5b --json gpu.json
    python benchmarks/gpu_reload.py --device cpu --shape tiny   # dry run of the code path (no GPU figures)

The GPU machine has torch but no vLLM, so the engine is the vLLM-shaped
model of `_toy_engine.py`: the same fused linears, weight loaders and, for
FP8, the quantize-on-arrival protocol of rlsync's `rlsync_fp8` plugin with the
plugin's own quantizers (`rlsync.quant.fp8_linear`). The reload is rlsync's
real one (`rlsync.reload.Reload`: begin, one `load` per layer group, commit),
fed bf16 tensors already on the device, one layer group at a time.

Reported per scheme: median seconds over repeated reloads (CUDA-synchronized),
GB/s of bf16 received, the multiple of the copy floor (a `torch` copy moving
the bytes the reload must move: 2 B read + 2 B write per bf16 parameter, 2 B
read + 1 B write per FP8-quantized one, measured on this device in the same
run), `torch.cuda.max_memory_allocated()` during the reload minus the memory
allocated before it, set against the model's bf16 size and its largest decoder
layer, the reload's own live-byte counter, and a bit-exact check of every
quantized weight and scale against `fp8_linear.quantize_full`.

Limitations:
1. No vLLM: kernels, attention and CUDA graphs are not exercised; only the
   reload and quantizer code paths that do not need vLLM.
2. Without CUDA it exits with a message, unless `--device cpu` asks for a
   dry run (then there are no allocator statistics and no GPU figures).
3. The source tensors live on the device for the whole run (a trainer's
   gathered groups would come and go); they are not counted as extra memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _toy_engine import SHAPES, ToyShape, build, checkpoint_groups  # noqa: E402

SCHEMES = ("bf16", "tensor", "channel", "block")


@dataclasses.dataclass(kw_only=True, slots=True)
class GpuReloadConfig:
    """What one GPU reload benchmark run measures."""

    shape: str = "bench"
    """Model shape: `bench` (BENCH_SPEC), `1.5b` (Qwen2-1.5B dimensions) or `tiny`."""
    schemes: tuple[str, ...] = SCHEMES
    """`bf16` (swap path, no quantization) and the FP8 schemes (quantize on arrival)."""
    plans: tuple[bool, ...] = (True, False)
    """Sync plan on (the engine's default: the first reload records, later ones replay) and off."""
    repeats: int = 10
    """Timed reloads per scheme after one warm-up."""
    device: str = "cuda"
    """`cuda`, or `cpu` for a dry run of the code path."""
    json_path: str | None = None
    """Also write the records here."""

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose from {', '.join(SHAPES)}")
        for s in self.schemes:
            if s not in SCHEMES:
                raise ValueError(f"unknown scheme {s!r}; choose from {', '.join(SCHEMES)}")
        if self.repeats < 1:
            raise ValueError("repeats must be at least 1")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_floor_s(nbytes: int, device: str, repeats: int = 20) -> float:
    """Median seconds of one device copy of `nbytes` bytes (reads and writes `nbytes` each)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 3):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def reload_once(session: Any, groups: list, device: str) -> tuple[float, int | None, int, bool | None]:
    """(seconds, peak extra allocated bytes or None on CPU, backend live-byte peak, planned) of one full reload."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    session.begin()
    for group in groups:
        session.load(group)
    session.commit()
    _sync(device)
    seconds = time.perf_counter() - start
    extra = torch.cuda.max_memory_allocated() - before if cuda else None
    return seconds, extra, session.peak_live_bytes, session.planned


def check_exact(model: torch.nn.Module, groups: list, fp8) -> tuple[int, list[str]]:
    """Compare every quantized weight/scale (and bf16 weight) with the reference, bit for bit.

    Returns (tensors compared, one line per tensor that differs: which, how many elements, which rows).
    """
    from rlsync.quant.fp8_linear import quantize_full

    tensors = {n: t for g in groups for n, t in g}
    checked, differ = 0, []
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}"
        for label, module, names in (
            ("qkv_proj", block.qkv_proj, [f"{p}.self_attn.{s}_proj.weight" for s in "qkv"]),
            ("o_proj", block.o_proj, [f"{p}.self_attn.o_proj.weight"]),
            ("gate_up_proj", block.gate_up_proj, [f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"]),
            ("down_proj", block.down_proj, [f"{p}.mlp.down_proj.weight"]),
        ):
            full = torch.cat([tensors[n] for n in names])
            want = {"weight": full} if fp8 is None else dict(zip(("weight", "weight_scale"), quantize_full(fp8, full, module.widths)))
            for pname, w in want.items():
                have = getattr(module, pname)
                checked += 1
                same = have.dtype == w.dtype and have.shape == w.shape
                diff = None if not same else (have.reshape(len(have), -1).view(torch.uint8)
                                              != w.contiguous().reshape(len(w), -1).view(torch.uint8))
                if diff is None or diff.any():
                    rows = "" if diff is None else diff.any(dim=1).nonzero().flatten().tolist()
                    differ.append(f"layers.{i}.{label}.{pname}: "
                                  + ("dtype/shape" if diff is None else f"{int(diff.sum())} bytes in rows {rows[0]}..{rows[-1]} "
                                     f"({len(rows)} of {len(w)})"))
    return checked, differ


def run_scheme(cfg: GpuReloadConfig, shape: ToyShape, scheme: str, plan: bool) -> dict[str, Any]:
    from rlsync.quant.fp8_linear import Fp8Config
    from rlsync.reload import Reload

    fp8 = None if scheme == "bf16" else Fp8Config(scheme=scheme)
    model = build(shape, fp8, cfg.device)
    groups = checkpoint_groups(shape, cfg.device, seed=2)
    num_bytes = sum(t.nbytes for g in groups for _, t in g)
    layer_bytes = max(sum(t.nbytes for _, t in g) for g in groups[1:-1])
    quantized = sum(t.numel() for g in groups for n, t in g if n.endswith("_proj.weight"))
    total = sum(t.numel() for g in groups for _, t in g)
    moved = 4 * total if fp8 is None else 3 * quantized + 4 * (total - quantized)
    floor = copy_floor_s(moved // 2, cfg.device)
    session = Reload(model, plan=plan)  # one session for every reload, as an engine keeps it: plans replay
    runs = [reload_once(session, groups, cfg.device) for _ in range(cfg.repeats + 1)]
    if plan and not all(r[3] for r in runs[1:]):
        raise AssertionError(f"{scheme}: a timed reload did not replay the plan: {session.plan_note}")
    times = [r[0] for r in runs[1:]]
    extras = [r[1] for r in runs if r[1] is not None]
    median = statistics.median(times)
    record = {
        "scheme": scheme, "plan": plan, "num_bytes": num_bytes, "layer_bytes": layer_bytes, "moved_bytes": moved,
        "floor_s": floor, "first_s": runs[0][0], "median_s": median, "gbps": num_bytes / 1e9 / median,
        "x_floor": median / floor, "peak_extra_bytes": max(extras) if extras else None,
        "peak_live_bytes": max(r[2] for r in runs),
    }
    record["checked"], record["differ"] = check_exact(model, groups, fp8)
    del model, groups
    if cfg.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return record


def format_table(shape_name: str, device: str, records: list[dict[str, Any]]) -> str:
    mib = lambda n: "-" if n is None else f"{n / 2**20:.1f}"  # noqa: E731
    r0 = records[0]
    lines = [
        f"{shape_name} shape on {device}: {mib(r0['num_bytes'])} MiB bf16, largest decoder layer {mib(r0['layer_bytes'])} MiB.",
        "",
        "| scheme | plan | median ms | first ms | GB/s | floor ms | x floor | peak extra alloc MiB | x model | x layer | live MiB | exact |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        extra = r["peak_extra_bytes"]
        x_model = "-" if extra is None else f"{extra / r['num_bytes']:.3f}"
        x_layer = "-" if extra is None else f"{extra / r['layer_bytes']:.2f}"
        lines.append(
            f"| {r['scheme']} | {'on' if r['plan'] else 'off'} | {r['median_s'] * 1e3:.2f} | {r['first_s'] * 1e3:.2f} | {r['gbps']:.1f} | "
            f"{r['floor_s'] * 1e3:.3f} | {r['x_floor']:.2f} | {mib(extra)} | {x_model} | {x_layer} | "
            f"{mib(r['peak_live_bytes'])} | "
            + (f"{r['checked']} tensors |" if not r["differ"] else f"**{len(r['differ'])} of {r['checked']} differ** |")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="bench", choices=sorted(SHAPES))
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    p.add_argument("--plan", choices=("both", "on", "off"), default="both", help="sync plan on, off or both (default)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)
    plans = {"both": (True, False), "on": (True,), "off": (False,)}[args.plan]
    cfg = GpuReloadConfig(shape=args.shape, schemes=tuple(args.schemes), plans=plans, repeats=args.repeats,
                          device=args.device, json_path=args.json_path)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_reload.py needs a CUDA GPU and torch.cuda.is_available() is False here; "
              "run it on a GPU machine (or pass --device cpu for a dry run without GPU figures).", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else "cpu (dry run)"
    records = [run_scheme(cfg, SHAPES[cfg.shape], s, plan) for s in cfg.schemes for plan in cfg.plans]
    print(format_table(cfg.shape, device_name, records))
    for r in records:
        for line in r["differ"][:5]:
            print(f"{r['scheme']} plan {'on' if r['plan'] else 'off'}: {line}")
    if cfg.json_path:
        Path(cfg.json_path).write_text(json.dumps({"device": device_name, "torch": torch.__version__,
                                                   "config": dataclasses.asdict(cfg), "records": records}, indent=1))
    return 1 if any(r["differ"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
