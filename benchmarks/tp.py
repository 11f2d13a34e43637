"""Sync time into a tensor-parallel engine: TP 1 against TP 2, per rank, on the bench model.

    .venv/bin/python benchmarks/tp.py                 # bench model; bf16, rlsync_fp8 channel and block; TP 1 and 2
    .venv/bin/python benchmarks/tp.py --quick         # CI smoke: tiny model, bf16, TP 2 only, 2 repeats
    .venv/bin/python benchmarks/tp.py --quick --tp 1 2  # the same with the TP-1 launch (one more torchrun)
    .venv/bin/python benchmarks/tp.py --quants bf16 --repeats 5 --json tp.json
    .venv/bin/python benchmarks/tp.py --table tp.json # re-print a saved run

Every (quant, TP size) cell is one `torchrun --nproc_per_node 2` launch of
this script (`--child`), OMP_NUM_THREADS=1 per rank, so both layouts run the
same two single-threaded processes on the two cores:
- TP 1: each rank builds its own TP-1 engine of the whole model (two
  data-parallel engines) and syncs every tensor into it;
- TP 2: the two ranks build one engine, each holding its half; each receives
  the same full tensors and loads its shard (rlsync's TP sync).
Why two TP-1 engines and not one process alone: the two TP-2 ranks share the
memory bus and caches; two TP-1 ranks share them the same way, so what differs
is only what each rank writes. A lone TP-1 process would have the bus to
itself and flatter TP 1.

Each rank builds, loads the checkpoint as a bf16 Hugging Face model (the same
perturbed weights on both ranks, `_methods.trainer_model`), syncs `repeats + 1`
times with a barrier before each, the first apart (it records the sync plan
and compiles the FP8 quantizer), then one untimed sync with `verify=True`
(each rank compares its own kernel tensors bit for bit). A sync's time is the
slowest rank's wall time (a TP-2 sync ends with the group's agreement, so its
ranks finish together); the table gives the median over the timed syncs.

Floors, per rank, measured by both ranks at once after the syncs (one thread
each, as the syncs ran; `_floor.copy_floor_s`):
- `x floor` (the shard floor): one copy moving the bytes a rank must touch at
  least: read its own elements in bf16 (2 B each) and write its kernel tensors
  (their bytes). TP 2 halves it: this is the floor of an ideal TP-2 sync, so
  a TP-2 sync at the same multiple as TP 1 is twice as fast.
- `x full-read floor`: read every received bf16 byte once and write the
  kernel tensors. Every rank of a TP group receives the full tensors and
  rlsync's NaN / Inf check reads each of them whole, so no TP-2 rank of this
  design can beat it: at best 0.75x TP 1's time in bf16 (2 + 1 B against
  2 + 2 per parameter) and about 0.83x in FP8 (2 + 0.5 against 2 + 1).
At TP 1 both floors are the same copy.

Limitations:
1. CPU, two cores, possibly shared (the table states the load average); the
   ratios within one run are the figures to compare.
2. A rank's bytes are its engine's parameters (kernel tensors, FP8 scales):
   what the sync writes. The bf16 elements it reads are counted as 2 B per
   parameter element, scales included (a few KiB too many).
3. Only the engine side: the source hands full tensors on every rank (as
   FSDP and ZeRO-3 sources gather them anyway); `gather.py` times gathers.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _floor import CheckpointFacts, copy_floor_s  # noqa: E402
from _methods import emit, quant_kwargs, trainer_model  # noqa: E402
from _run import config_fields, env_line, free_port, model_parser, run_model  # noqa: E402
from sync import DENSE_MODELS, model_path  # noqa: E402

QUANTS = ("bf16", "rlsync_fp8/channel", "rlsync_fp8/block")
TP_SIZES = (1, 2)
NUM_RANKS = 2


@dataclasses.dataclass(kw_only=True, slots=True)
class TPBenchConfig:
    """What one run measures."""

    model: str = "bench"
    """`bench` (BENCH_SPEC, ~250M parameters) or `tiny`."""
    quants: tuple[str, ...] = QUANTS
    """`bf16`, `fp8_per_channel`, `rlsync_fp8/<scheme>`."""
    tp_sizes: tuple[int, ...] = TP_SIZES
    """Engine layouts over the two ranks: 1 (two TP-1 engines) and 2 (one TP-2 engine)."""
    repeats: int = 5
    """Timed syncs after the first (the median is reported)."""
    verify: bool = True
    """One more, untimed sync with `verify=True` on every rank."""
    quick: bool = False
    """The smoke-test variant (recorded so the table knows which plan ran)."""
    timeout_s: float = 900.0
    """Per-launch limit."""
    json_path: str | None = None
    """Also write every record and the environment to this file."""

    def __post_init__(self) -> None:
        if self.model not in DENSE_MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose from {', '.join(DENSE_MODELS)}")
        if any(k not in (1, NUM_RANKS) for k in self.tp_sizes):
            raise ValueError(f"tp sizes are 1 or {NUM_RANKS} (two ranks)")
        if self.repeats < 1:
            raise ValueError("repeats must be at least 1")


# ------------------------------------------------------------------ parent
def launch(path: str, quant: str, tp: int, cfg: TPBenchConfig) -> list[str]:
    """The torchrun command of one cell: both ranks run `child`, rank 0 prints both ranks' records."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--nproc_per_node", str(NUM_RANKS), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           __file__, "--child", "--model-path", path, "--quant", quant, "--tp", str(tp), "--repeats", str(cfg.repeats)]
    return cmd + ([] if cfg.verify else ["--no-verify"])


def run(cfg: TPBenchConfig) -> dict[str, Any]:
    path = model_path(cfg.model)
    cells = [(launch(path, q, tp, cfg), {"quant": q, "tp": tp}) for q in cfg.quants for tp in cfg.tp_sizes]
    return run_model(cfg, path, cells, _progress)


def slowest(record: dict[str, Any]) -> dict[str, float]:
    """Per sync the slowest rank's seconds, wall and process CPU: the medians over the timed syncs; the first sync's."""
    ranks = record["ranks"]

    def median_of_max(key: str) -> float:
        return statistics.median(max(r[key][i] for r in ranks) for i in range(len(ranks[0][key])))

    return {"median_s": median_of_max("times_s"), "cpu_median_s": median_of_max("cpu_times_s"),
            "first_s": max(r["first_s"] for r in ranks)}


def _progress(r: dict[str, Any]) -> str:
    what = f"{r['quant']:<20} TP {r['tp']}"
    if r["status"] != "ok":
        return f"{what} FAILED {r['error']}"
    s = slowest(r)
    return f"{what} median {s['median_s']:.4f} s  first {s['first_s']:.4f} s  verify {r['ranks'][0].get('verify', '-')}"


# ------------------------------------------------------------------ child (one rank)
def child(args: argparse.Namespace) -> dict[str, Any]:
    """One rank of a launch: build, sync, verify, floors; rank 0 returns both ranks' records."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")  # before the engine (external_launcher builds its groups from it)
    from rlsync.adapters.vllm_layers import kernel_nbytes
    from rlsync.engine import VLLMEngine

    start = time.perf_counter()
    engine = VLLMEngine(args.model_path, tensor_parallel_size=args.tp, **quant_kwargs(args.quant))
    build_s = time.perf_counter() - start
    trainer = trainer_model(args.model_path)
    # a weight vLLM packed into a oneDNN / sgl handle (AVX-512, AMX) is empty on the module: count it unpacked
    owners = {id(p): (m, n) for _, m in reversed(list(engine.model.named_modules()))
              for n, p in m.named_parameters(recurse=False)}  # a tied parameter counts once, at its first owner
    held = [(kernel_nbytes(*owners[id(p)]), p.element_size()) for _, p in engine.named_kernel_tensors()]
    engine_bytes = sum(nbytes for nbytes, _ in held)
    read_bytes = sum(2 * nbytes // size for nbytes, size in held)
    times, cpu_times, planned = [], [], []
    for step in range(1, args.repeats + 2):
        dist.barrier()
        cpu_start, t0 = time.process_time(), time.perf_counter()
        report = engine.sync(trainer, step)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - cpu_start)
        planned.append(report.planned)
    record: dict[str, Any] = {
        "rank": dist.get_rank(), "tp_rank": engine.tp_rank, "tp_size": engine.tp_size, "build_s": build_s,
        "torch_threads": torch.get_num_threads(), "engine_bytes": engine_bytes, "read_bytes": read_bytes,
        "received_bytes": report.num_bytes, "num_tensors": report.num_tensors, "first_s": times[0],
        "times_s": times[1:], "cpu_times_s": cpu_times[1:], "report_s": report.seconds, "planned": planned,
    }
    if args.verify:
        checked = engine.sync(trainer, args.repeats + 2, verify=True)
        record["verify"] = f"ok ({checked.num_verified} tensors)" if checked.verified else "FAILED"
    del trainer
    gc.collect()
    dist.barrier()  # both ranks copy at once, as both synced at once
    record["shard_floor_s"] = copy_floor_s((engine_bytes + read_bytes) // 2)
    dist.barrier()
    full_read = (engine_bytes + report.num_bytes) // 2  # at TP 1 the same bytes: the same copy
    record["full_read_floor_s"] = copy_floor_s(full_read) if args.tp > 1 else record["shard_floor_s"]
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, record)
    return {"quant": args.quant, "tp": args.tp, "status": "ok", "ranks": ranks}


# ------------------------------------------------------------------ table
def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def _load(record: dict[str, Any]) -> str:
    """The 1-minute load average before / after the cell (runs from before it was recorded: -)."""
    return " / ".join(f"{x:.1f}" for x in record["load_1min"]) if "load_1min" in record else "-"


def format_table(result: dict[str, Any]) -> str:
    facts = CheckpointFacts(**result["facts"])
    lines = [
        env_line(result["env"]),
        "",
        f"**{result['model']}** ({facts.num_params / 1e6:.1f}M parameters, {_mib(facts.num_bytes)} MiB bf16). "
        f"{NUM_RANKS} ranks under torchrun, one thread each; TP 1: two TP-1 engines (one per rank), TP 2: one engine "
        "over both ranks. Seconds: the slowest rank's, median of the timed syncs (CPU s: that rank's process CPU time, "
        "to which waiting for a busy core adds nothing). Floors: per rank, both ranks copying at once (see the module "
        "docstring). `TP 2 / TP 1`: wall / CPU. `load`: the 1-minute load average before / after the cell.",
        "",
        "| quant | TP | engine MiB / rank | received MiB / rank | median s | CPU s | first s | x floor | x full-read floor "
        "| floor ms (shard / full read) | TP 2 / TP 1 | planned | verify | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    tp1 = {r["quant"]: slowest(r) for r in result["records"] if r["status"] == "ok" and r["tp"] == 1}
    for r in result["records"]:
        if r["status"] != "ok":
            lines.append(f"| {r['quant']} | {r['tp']} | failed: {r['error']} | | | | | | | | | | | |")
            continue
        s, ranks = slowest(r), r["ranks"]
        shard = max(k["shard_floor_s"] for k in ranks)
        full = max(k["full_read_floor_s"] for k in ranks)
        base = tp1.get(r["quant"]) if r["tp"] != 1 else None
        ratio = f"{s['median_s'] / base['median_s']:.2f} / {s['cpu_median_s'] / base['cpu_median_s']:.2f}" if base else "-"
        replayed = "yes" if all(all(k["planned"][1:]) for k in ranks) else "no"
        verify = ", ".join(sorted({k.get("verify", "-") for k in ranks}))
        lines.append(
            f"| {r['quant']} | {r['tp']} | {_mib(max(k['engine_bytes'] for k in ranks))} | "
            f"{_mib(ranks[0]['received_bytes'])} | {s['median_s']:.4f} | {s['cpu_median_s']:.4f} | {s['first_s']:.4f} | "
            f"{s['median_s'] / shard:.1f} | "
            f"{s['median_s'] / full:.1f} | {shard * 1e3:.1f} / {full * 1e3:.1f} | {ratio} | {replayed} | {verify} | {_load(r)} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, TPBenchConfig | None]:
    p = model_parser(__doc__, "CI smoke: tiny model, bf16, TP 2, 2 repeats (with --tp 1 2: both)", DENSE_MODELS, QUANTS)
    p.add_argument("--tp", dest="tp_sizes", nargs="+", type=int, default=None, help="TP sizes (default: 1 2)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--no-verify", action="store_true", help="skip the verified sync after the timed ones")
    args = p.parse_args(argv)
    if args.child:
        args.tp, args.verify = args.tp_sizes[0], not args.no_verify
        return args, None
    quick = {"model": "tiny", "quants": ("bf16",), "tp_sizes": (2,), "repeats": 2}
    fields = config_fields(args, quick, ("model", "quants", "tp_sizes", "repeats"))
    return args, TPBenchConfig(verify=not args.no_verify, json_path=args.json_path, quick=args.quick, **fields)


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    if args.table:
        for path in args.table:
            print(format_table(json.loads(Path(path).read_text())))
        return 0
    if cfg is None:
        record = child(args)
        if os.environ["RANK"] == "0":
            emit(record)
        return 0
    result = run(cfg)
    print(format_table(result))
    return 1 if any(r["status"] != "ok" for r in result["records"]) else 0


if __name__ == "__main__":
    sys.exit(main())
