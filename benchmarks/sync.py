"""Weight-sync benchmark: rlsync against what practitioners use today, same run, same model.

    .venv/bin/python benchmarks/sync.py                  # tiny + ~250M model, every method (~25 min on 2 cores)
    .venv/bin/python benchmarks/sync.py --quick          # CI smoke: tiny model, 2 methods, 2 repeats
    .venv/bin/python benchmarks/sync.py --models bench --quants bf16 fp8_per_channel --json out.json
    .venv/bin/python benchmarks/sync.py --moe --threads 1          # MoE section: 512M Qwen3-MoE + expert-count series
    .venv/bin/python benchmarks/sync.py --moe --quick              # CI smoke of the MoE section (tiny MoE)

For every (model, quant, method) a fresh subprocess (`--child`) builds a
colocated vLLM engine, syncs the same perturbed bf16 weights `repeats + 1`
times and reports the median of the last `repeats`, the first sync apart, the
peak extra RSS during a sync and the reload backend's own live-byte counter
(see `_methods.py` for each method and exactly how memory is measured). This
process measures the memory-bandwidth floor (`_floor.py`) and prints one
markdown table: median seconds, ratio to rlsync's sync for the same quant,
multiple of the copy floor, GB/s of bf16 received, peak extra memory, the
time rlsync's always-on NaN / Inf check took inside its sync (and the sync's
ratio with it to without it), and whether the engine then held exactly the trainer's weights (`--verify`).
With `--moe` it runs the MoE section instead (`_moe.py`: rlsync's bf16 and FP8
syncs against vLLM's native bf16 reload, and the cost of a sync as the expert
count grows at fixed bytes) and adds its two tables.

Why subprocesses: peak RSS of one method must not hide in heap pages an
earlier method freed; and a method that crashes or corrupts the engine (trl's
per-parameter load on an FP8 engine) must not take the others with it.

Limitations:
1. Times on a shared machine are noisy: the table states the load average
   before and after; ratios within one run are the figures to compare.
2. Only what runs on this machine's vLLM build is measured; on CPUs without
   AVX-512 vLLM's online FP8 runs as `fp8_per_channel` only, so other FP8
   schemes appear only through rlsync's plugin (`rlsync_fp8/<scheme>`) when it
   is installed.
3. GPU figures come from `benchmarks/gpu_reload.py` on a GPU machine, not here.
4. vLLM's CPU worker leaves torch at the machine's thread count (its own
   reduction to 1 thread is skipped by its `set_num_threads` guard); on a
   machine shared with other work, every multi-threaded parallel region can
   wait a scheduler time slice for its second thread, which swamps syncs made
   of many small tensors. `--threads N` sets `OMP_NUM_THREADS` for every
   method's process so runs are comparable; the table states what ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _floor import CheckpointFacts, checkpoint_facts, copy_floor_s  # noqa: E402
from _methods import METHODS, OPT_IN_METHODS, emit  # noqa: E402
from _methods import run_child as measure_method  # noqa: E402
from _moe import MOE_MODELS, PLAN, QUICK_PLAN, format_moe  # noqa: E402
from _run import env_line, environment, load_average, run_child  # noqa: E402

BASE_QUANTS = ("bf16", "fp8_per_channel")
DENSE_MODELS = ("tiny", "bench")
MODELS = (*DENSE_MODELS, *MOE_MODELS)
QUICK_METHODS = ("rlsync", "native")
# With the default method list, the two slowest baselines run for bf16 and vLLM's own FP8 only: they
# tell the same story for every scheme. Other baselines run everywhere (a failure is a finding).
BASE_ONLY_METHODS = ("native-shuffled", "rebuild")


@dataclasses.dataclass(kw_only=True, slots=True)
class SyncBenchConfig:
    """What one benchmark run measures."""

    models: tuple[str, ...] = ()
    """`tiny` (rlsync.default_model default), `bench` (BENCH_SPEC, ~250M parameters), MoE models (`_moe.MOE_MODELS`);
    empty = `tiny` and `bench`, or with `moe` every model of the MoE plan."""
    moe: bool = False
    """Run the MoE section (`_moe.PLAN`; `_moe.QUICK_PLAN` with `quick`), filtered by models / quants / methods."""
    quick: bool = False
    """The smoke-test variant (recorded so the tables know which plan ran)."""
    threads: int | None = None
    """`OMP_NUM_THREADS` for every method's process; None = inherited (vLLM then keeps torch at the core count)."""
    quants: tuple[str, ...] = ()
    """`bf16`, `fp8_per_channel`, `rlsync_fp8/<scheme>`; empty = every one available here."""
    methods: tuple[str, ...] = ()
    """Sync methods (see `_methods.py`); empty = all, `native-shuffled` and `rebuild` for base quants only."""
    repeats: int = 3
    """Timed syncs per method after the first (the median is reported)."""
    rebuild_repeats: int = 2
    """Timed syncs for `rebuild` (each builds an engine)."""
    verify: bool = True
    """Check the engine's tensors bit for bit against the trainer's after the last sync."""
    timeout_s: float = 900.0
    """Per-method subprocess limit."""
    json_path: str | None = None
    """Also write every record and the environment to this file."""

    def __post_init__(self) -> None:
        for m in self.models:
            if m not in MODELS:
                raise ValueError(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        if self.repeats < 1 or self.rebuild_repeats < 1:
            raise ValueError("repeats and rebuild_repeats must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be at least 1")


def available_quants() -> list[str]:
    """bf16, vLLM's online FP8, and rlsync's plugin schemes when the plugin is installed."""
    quants = list(BASE_QUANTS)
    plugin = any(e.name == "rlsync_fp8" for e in importlib.metadata.entry_points(group="vllm.general_plugins"))
    if plugin and importlib.util.find_spec("rlsync.quant.fp8_linear") is not None:
        from rlsync.quant.fp8_linear import SCHEMES

        quants += [f"rlsync_fp8/{s}" for s in SCHEMES]
    return quants


def methods_for(quant: str, cfg: SyncBenchConfig) -> tuple[str, ...]:
    if cfg.methods:
        return cfg.methods
    return tuple(m for m in METHODS
                 if m not in OPT_IN_METHODS and (quant in BASE_QUANTS or m not in BASE_ONLY_METHODS))


def cells(cfg: SyncBenchConfig) -> list[tuple[str, str, str]]:
    """(model, quant, method) in run order."""
    if cfg.moe:
        plan = QUICK_PLAN if cfg.quick else PLAN
        return [(m, q, meth) for m, q, meth in plan.cells()
                if (not cfg.models or m in cfg.models) and (not cfg.quants or q in cfg.quants)
                and (meth in cfg.methods if cfg.methods else meth not in OPT_IN_METHODS)]
    quants = list(cfg.quants) or available_quants()
    return [(m, q, meth) for m in cfg.models or DENSE_MODELS for q in quants for meth in methods_for(q, cfg)]


def model_spec(name: str):
    from rlsync.default_model import BENCH_SPEC, TinyModelSpec

    return MOE_MODELS.get(name) or (BENCH_SPEC if name == "bench" else TinyModelSpec())


def model_path(name: str) -> str:
    from rlsync.default_model import tiny_model_path

    return str(tiny_model_path(model_spec(name)))


def run_method(path: str, quant: str, method: str, cfg: SyncBenchConfig) -> dict[str, Any]:
    """One method in a fresh interpreter; its record (or why there is none)."""
    repeats = cfg.rebuild_repeats if method == "rebuild" else cfg.repeats
    cmd = [sys.executable, __file__, "--child", "--model-path", path, "--quant", quant, "--method", method,
           "--repeats", str(repeats)] + ([] if cfg.verify else ["--no-verify"])
    env = dict(os.environ) if cfg.threads is None else {**os.environ, "OMP_NUM_THREADS": str(cfg.threads)}
    return run_child(cmd, env, cfg.timeout_s, quant=quant, method=method)


def run(cfg: SyncBenchConfig) -> dict[str, Any]:
    env = environment(cfg.threads)
    start = time.perf_counter()
    models: dict[str, dict[str, Any]] = {}
    for name, quant, method in cells(cfg):
        if name not in models:
            path = model_path(name)
            facts = checkpoint_facts(path)
            floor = {"bf16": copy_floor_s(facts.num_bytes, threads=cfg.threads),
                     "fp8": copy_floor_s(facts.fp8_moved_bytes // 2, threads=cfg.threads)}
            models[name] = {"name": name, "path": path, "spec": dataclasses.asdict(model_spec(name)),
                            "facts": dataclasses.asdict(facts), "floor_s": floor, "records": []}
        record = run_method(models[name]["path"], quant, method, cfg)
        record["model"] = name
        models[name]["records"].append(record)
        print(_progress(record), file=sys.stderr, flush=True)
    env["load_after"] = load_average()
    env["wall_s"] = time.perf_counter() - start
    result = {"env": env, "config": dataclasses.asdict(cfg), "models": list(models.values())}
    if cfg.json_path:
        Path(cfg.json_path).write_text(json.dumps(result, indent=1))
    return result


def _progress(r: dict[str, Any]) -> str:
    what = f"{r['model']:>5} {r['quant']:<20} {r['method']:<16}"
    if r["status"] != "ok":
        return f"{what} FAILED {r['error']}"
    return f"{what} median {r['median_s']:.4f} s  first {r['first_s']:.4f} s  verify {r.get('verify', '-')}"


# ------------------------------------------------------------------ table
def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _short(verify: str) -> str:
    return verify.replace("SyncError: verify failed: ", "").replace(": bits differ from the reference", " differs")


def _check(record: dict[str, Any]) -> str:
    """The always-on NaN / Inf check's share of the sync: seconds, and the sync with it / without it."""
    if "check_s_median" not in record:
        return "-"
    check, total = record["check_s_median"], record["median_s"]
    return f"{check * 1e3:.1f} ms ({total / max(total - check, 1e-12):.3f}x)"


def format_table(result: dict[str, Any]) -> str:
    env = result["env"]
    lines = [env_line(env), ""]
    for model in result["models"]:
        facts, floor = CheckpointFacts(**model["facts"]), model["floor_s"]
        lines += [
            f"**{model['name']}** ({facts.num_params / 1e6:.1f}M parameters, {_mib(facts.num_bytes)} MiB bf16, "
            f"largest decoder layer {_mib(facts.layer_bytes)} MiB, largest tensor {_mib(facts.max_tensor_bytes)} MiB). Copy floor: bf16 bytes {floor['bf16'] * 1e3:.2f} ms, "
            f"FP8 requant bytes (2 B read + 1 B write per quantized parameter) {floor['fp8'] * 1e3:.2f} ms.",
            "",
            "| quant | method | median s | best s | first s | vs rlsync | x floor | GB/s | peak extra RSS MiB | backend live MiB "
            "| NaN/Inf check | verify |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        base = {r["quant"]: r["median_s"] for r in model["records"] if r["method"] == "rlsync" and r["status"] == "ok"}
        for r in model["records"]:
            if r["status"] != "ok":
                lines.append(f"| {r['quant']} | {r['method']} | failed: {r['error']} | | | | | | | | | |")
                continue
            f = floor["bf16"] if r["quant"] == "bf16" else floor["fp8"]
            ratio = f"{r['median_s'] / base[r['quant']]:.2f}" if r["quant"] in base else "-"
            method = r["method"] + (" (plan)" if r.get("planned") and all(r["planned"][1:]) else "")
            lines.append(
                f"| {r['quant']} | {method} | {r['median_s']:.4f} | {min(r['times_s']):.4f} | {r['first_s']:.4f} | {ratio} | "
                f"{r['median_s'] / f:.1f} | {r['num_bytes'] / 1e9 / r['median_s']:.2f} | {_mib(r['peak_rss_bytes'])} | "
                f"{_mib(r.get('peak_live_bytes'))} | {_check(r)} | {_short(r.get('verify', '-'))} |"
            )
        lines.append("")
    return "\n".join(lines)


def _tables(result: dict[str, Any]) -> str:
    """The per-model tables, then the MoE section's own when it ran."""
    return format_table(result) + ("\n" + format_moe(result) if result["config"].get("moe") else "")


# ------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, SyncBenchConfig | None]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke: tiny model, bf16, rlsync + native, 2 repeats")
    p.add_argument("--moe", action="store_true", help="the MoE section (with --quick: a tiny MoE)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every method's process")
    p.add_argument("--models", nargs="+", default=None, choices=MODELS)
    p.add_argument("--quants", nargs="+", default=None, help="bf16 fp8_per_channel rlsync_fp8/<scheme> (default: all here)")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--no-verify", action="store_true", help="skip the bit-exact check after the last sync")
    p.add_argument("--json", dest="json_path", default=None, help="write all records here")
    p.add_argument("--table", nargs="+", default=None, metavar="JSON", help="print the table of earlier --json runs, run nothing")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--quant", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return args, None
    quick = {"repeats": 2, "rebuild_repeats": 1}
    if not args.moe:
        quick.update(models=("tiny",), quants=("bf16",), methods=QUICK_METHODS)
    fields = quick if args.quick else {}
    for key in ("models", "quants", "methods"):
        if getattr(args, key) is not None:
            fields[key] = tuple(getattr(args, key))
    if args.repeats is not None:
        fields["repeats"] = args.repeats
    return args, SyncBenchConfig(verify=not args.no_verify, json_path=args.json_path, moe=args.moe, quick=args.quick,
                                 threads=args.threads, **fields)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args, cfg = parse_args(argv)
    if args.table:
        for path in args.table:
            print(_tables(json.loads(Path(path).read_text())))
        return 0
    if cfg is None:
        emit(measure_method(args.model_path, args.quant, args.method, args.repeats, not args.no_verify))
        return 0
    result = run(cfg)
    print(_tables(result))
    failed = [r for m in result["models"] for r in m["records"] if r["status"] != "ok" and r["method"].startswith("rlsync")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
