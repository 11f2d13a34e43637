"""Trainer-side gather cost under ZeRO-3: rlsync's per-layer-group gathers vs one gather per parameter.

    DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 benchmarks/gather.py                 # tiny model
    DS_ACCELERATOR=cpu .venv/bin/deepspeed --num_gpus 2 benchmarks/gather.py --model bench --repeats 3

Two ranks (gloo on CPU, NCCL on GPUs) build a DeepSpeed ZeRO-3 engine over
the same checkpoint (fp32, DeepSpeed's default persistence threshold) and
read every full parameter once per repeat, in two ways:
- `group`: `rlsync.source.Zero3Source(engine).groups()`, one
  `GatheredParameters` per layer group (rlsync's source);
- `param`: trl 1.16's ZeRO-3 practice, one `GatheredParameters([p])` per
  parameter (`trl.distributed` `gather_params`, called per parameter by the
  colocated sync).
Each repeat is timed between barriers on every rank; the slowest rank's time
counts. Reported: median seconds, the ratio group/param, and the most
gathered bytes held at once (the source's own counter for `group`; the
largest parameter for `param`) against the largest layer group.

Limitations:
1. CPU + gloo here; the ratio on GPUs with NCCL will differ (fewer, larger
   collectives favour groups more there).
2. Nothing consumes the gathered tensors (no engine): this isolates the
   gather cost the issue's trainer-side target is about.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def build_engine(path: str):
    import deepspeed
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def by_group(engine) -> tuple[int, int]:
    """(bytes read, peak gathered bytes) through rlsync's ZeRO-3 source."""
    from rlsync.source import Zero3Source

    source = Zero3Source(engine)
    total = 0
    for group in source.groups():
        total += sum(t.nbytes for _, t in group)
    return total, source.stats.peak_bytes


def by_param(engine) -> tuple[int, int]:
    """(bytes read, peak gathered bytes) with one `GatheredParameters` per parameter (trl's practice)."""
    import deepspeed

    total = peak = 0
    for _, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            total += p.data.nbytes
            peak = max(peak, p.data.nbytes)
    return total, peak


def timed(fn: Callable, engine, repeats: int) -> dict:
    import torch.distributed as dist

    times, out = [], (0, 0)
    for i in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        out = fn(engine)
        seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        if i > 0:
            times.append(float(seconds))
    return {"median_s": statistics.median(times), "times_s": times, "bytes": out[0], "peak_gathered_bytes": out[1]}


def largest_group_bytes(engine) -> int:
    from rlsync.source.names import group_key, hf_name

    groups: dict[object, int] = {}
    for name, p in engine.module.named_parameters():
        shape = getattr(p, "ds_shape", p.shape)
        groups[group_key(hf_name(name))] = groups.get(group_key(hf_name(name)), 0) + torch.Size(shape).numel() * p.element_size()
    return max(groups.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", choices=("tiny", "bench"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = p.parse_args(argv)
    if args.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rlsync.default_model import BENCH_SPEC, tiny_model_path
    from rlsync.trainer import init_deepspeed

    path = str(tiny_model_path(BENCH_SPEC if args.model == "bench" else None))
    init_deepspeed("gloo")  # DeepSpeed's group, without leaving its CPU all-reduce buffers in /dev/shm
    engine = build_engine(path)
    results = {"group": timed(by_group, engine, args.repeats), "param": timed(by_param, engine, args.repeats)}
    import torch.distributed as dist

    if dist.get_rank() == 0:
        layer = largest_group_bytes(engine)
        g, q = results["group"], results["param"]
        print(f"ZeRO-3, {dist.get_world_size()} ranks ({dist.get_backend()}), {args.model} model, "
              f"{g['bytes'] / 2**20:.1f} MiB fp32, largest group {layer / 2**20:.1f} MiB, "
              f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
        print("| gather | median s | vs per-parameter | peak gathered MiB | x largest group |")
        print("|---|---|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['median_s']:.4f} | {r['median_s'] / q['median_s']:.2f} | "
                  f"{r['peak_gathered_bytes'] / 2**20:.1f} | {r['peak_gathered_bytes'] / layer:.2f} |")
        if args.json_path:
            Path(args.json_path).write_text(json.dumps({"model": args.model, "largest_group_bytes": layer,
                                                        "results": results}, indent=1))
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
