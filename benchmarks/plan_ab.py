"""Plan on, plan off and recording syncs on one engine, interleaved: the sync plan's ratios without the drift.

    .venv/bin/python benchmarks/plan_ab.py --models bench --quants bf16 rlsync_fp8/channel --rounds 8
    .venv/bin/python benchmarks/plan_ab.py --models moe-e8 moe-e256 --quants bf16 --rounds 4
    .venv/bin/python benchmarks/plan_ab.py --models moe-e8 moe-e256 --quants bf16 --rounds 6 --together
    .venv/bin/python benchmarks/plan_ab.py --quick          # CI smoke: tiny model, bf16, 2 rounds

Why: `sync.py` times each method in a process of its own, minutes apart. On a
shared 2-core machine one cell moves by 20-30% between runs, and the copy floor
by as much (35-47 ms for the bench model's FP8 bytes across three runs of one
session), so a ratio of two cells, or of a cell to a floor taken minutes
earlier, carries that drift. Here one process (per model and quant) builds one
rlsync engine and, round after round, times:
- `plan`: a planned sync (the plan the previous sync left);
- `noplan`: the plan switched off (`backend.plan = None`: vLLM's `load_weights`
  per group, what `sync_plan=False` does);
- `record`: a recording sync (the plan cleared first: every group records, as a
  first sync does);
- `floor`: the copy floor of the bytes a sync must move (`_floor.copy_floor_s`,
  3 copies).
The order is reversed every other round. Each ratio is taken within a round and
the median over rounds is reported: record / noplan (a first sync against a
sync without a plan), plan / noplan, and each mode / the round's floor. Every
timed sync checks its `SyncReport.planned` (True, None, False); the engine is
verified bit for bit at the end.

Comparing models (`--processes N`): two models are two engines, hence two
processes, and a process on this machine can run 1.3-1.5x slower than the one
before it for the same work (an MoE series measured 1.43x in one pair of
processes and 1.07x in the next). `--processes N` runs the whole (model,
quant) list N times, cycling through it, and adds a summary per (model, quant):
the median over processes of each process's median planned sync and of its
plan x floor, and both as a ratio to the first model of the list (the MoE
scaling target: 256 experts against 8).

One process for all models (`--together`): each quant gets one process that
builds every model's engine side by side and times planned syncs alternating
model by model (the order reversed every other round); each model's ratio to
the first model is the median of the per-round ratios. Two engines in one
process sync slower than one alone, but equally so, and there is no drift
between processes (the bf16 MoE series: 256 experts at 1.02x the time of 8 in
one process, where three pairs of processes read 1.37-1.67x).

Limitations:
1. rlsync's modes only: vLLM's native reload needs an engine of its own (`sync.py` times it).
2. One engine for all modes: the allocator's state carries over from one mode to the next, as between the
   steps of a training run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _floor import checkpoint_facts, copy_floor_s  # noqa: E402
from _methods import Bench, emit  # noqa: E402
from _run import SINGLE_THREAD_ENV, env_line, environment, load_average, run_child  # noqa: E402

MODES = ("plan", "noplan", "record")
PLANNED = {"plan": True, "noplan": None, "record": False}
"""What each mode's `SyncReport.planned` must say."""


def timed_sync(bench: Bench, planned: bool | None, what: str) -> float:
    """Seconds of one sync of `bench`'s trainer into its engine, which must report `planned`."""
    bench.step += 1
    start = time.perf_counter()
    report = bench.engine.sync(bench.trainer, bench.step)
    seconds = time.perf_counter() - start
    if report.planned is not planned:
        raise RuntimeError(f"{what}: the sync reported planned={report.planned}")
    return seconds


def measure(model: str, quant: str, rounds: int) -> dict[str, Any]:
    """One (model, quant) in this process: every mode and the floor, `rounds` times, interleaved."""
    from sync import model_path

    path = model_path(model)
    facts = checkpoint_facts(path)
    floor_bytes = facts.num_bytes if quant == "bf16" else facts.fp8_moved_bytes // 2
    bench = Bench(path, quant, "rlsync")
    backend = bench.engine.backend
    plan = backend.plan
    for _ in range(2):  # warm: the first sync records, the second replays
        bench.sync()
    times: dict[str, list[float]] = {m: [] for m in (*MODES, "floor")}
    for r in range(rounds):
        for mode in (*MODES, "floor") if r % 2 == 0 else ("floor", *MODES[::-1]):
            if mode == "floor":
                times["floor"].append(copy_floor_s(floor_bytes, repeats=3))
                continue
            backend.plan = None if mode == "noplan" else plan
            if mode == "record":
                plan.clear()
            times[mode].append(timed_sync(bench, PLANNED[mode], mode))
            backend.plan = plan
    verified = bench.verify()

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    return {"model": model, "quant": quant, "rounds": rounds, "status": "ok", "times_s": times,
            "median_s": {m: statistics.median(v) for m, v in times.items()},
            "record_vs_noplan": ratio("record", "noplan"), "plan_vs_noplan": ratio("plan", "noplan"),
            "x_floor": {m: ratio(m, "floor") for m in MODES}, "verify": f"ok ({verified} tensors)"}


def measure_together(quant: str, models: list[str], rounds: int) -> dict[str, Any]:
    """Every model's engine in this process, planned syncs alternating model by model, `rounds` times."""
    from sync import model_path

    benches = {model: Bench(model_path(model), quant, "rlsync") for model in models}
    for bench in benches.values():
        for _ in range(2):  # the first sync records, the second replays
            bench.sync()
    times: dict[str, list[float]] = {model: [] for model in models}
    for r in range(rounds):
        for model in models if r % 2 == 0 else models[::-1]:
            times[model].append(timed_sync(benches[model], True, model))
    first = times[models[0]]
    return {"models": models, "quant": quant, "rounds": rounds, "status": "ok", "times_s": times,
            "median_s": {m: statistics.median(v) for m, v in times.items()},
            "vs_first": {m: statistics.median(t / f for t, f in zip(v, first, strict=True)) for m, v in times.items()},
            "verify": {m: f"ok ({bench.verify()} tensors)" for m, bench in benches.items()}}


def together_table(result: dict[str, Any]) -> str:
    lines = [env_line(result["env"]), "", "| quant | model | plan s | vs first model | verify |", "|---|---|---|---|---|"]
    for r in result["records"]:
        if r["status"] != "ok":
            lines.append(f"| {r['quant']} | {r['model']} | failed: {r['error']} |")
            continue
        lines += [f"| {r['quant']} | {m} | {r['median_s'][m]:.4f} | {r['vs_first'][m]:.3f} | {r['verify'][m]} |"
                  for m in r["models"]]
    return "\n".join(lines) + "\n\nAll models' engines in one process per quant, planned syncs alternating; " \
                              "`vs first model`: median of the per-round ratios."


def table(result: dict[str, Any]) -> str:
    lines = [env_line(result["env"]), "",
             "| process | model | quant | plan s | noplan s | record s | floor ms | plan / noplan | record / noplan "
             "| plan x floor | verify |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        if r["status"] != "ok":
            lines.append(f"| {r.get('process', 1)} | {r['model']} | {r['quant']} | failed: {r['error']} |")
            continue
        m = r["median_s"]
        lines.append(f"| {r.get('process', 1)} | {r['model']} | {r['quant']} | {m['plan']:.4f} | {m['noplan']:.4f} "
                     f"| {m['record']:.4f} | {m['floor'] * 1e3:.1f} | {r['plan_vs_noplan']:.2f} "
                     f"| {r['record_vs_noplan']:.2f} | {r['x_floor']['plan']:.1f} | {r['verify']} |")
    text = "\n".join(lines) + f"\n\nRatios: median over {result['records'][0].get('rounds', '-')} rounds of each " \
                              "round's own ratio (floor: the copy floor measured in that round)."
    summary = across_processes(result["records"])
    if summary:
        text += "\n\n" + "\n".join([
            "| model | quant | processes | plan s | plan x floor | plan s / first model's | plan x floor / first "
            "model's |", "|---|---|---|---|---|---|---|",
            *(f"| {s['model']} | {s['quant']} | {s['processes']} | {s['plan_s']:.4f} | {s['plan_x_floor']:.2f} "
              f"| {s['plan_s_vs_first']:.2f} | {s['x_floor_vs_first']:.2f} |" for s in summary)])
        text += "\n\nAcross processes: the median over processes of each process's median (first model: " \
                f"{summary[0]['model']})."
    return text


def across_processes(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, quant), the median over processes of the planned sync and its x floor, and both against the
    first model's for the same quant; empty unless some (model, quant) ran in more than one process."""
    ok = [r for r in records if r["status"] == "ok"]
    keys = list(dict.fromkeys((r["model"], r["quant"]) for r in ok))
    per = {k: [r for r in ok if (r["model"], r["quant"]) == k] for k in keys}
    if all(len(v) < 2 for v in per.values()):
        return []
    rows, first = [], {}
    for (model, quant), rs in per.items():
        row = {"model": model, "quant": quant, "processes": len(rs),
               "plan_s": statistics.median(r["median_s"]["plan"] for r in rs),
               "plan_x_floor": statistics.median(r["x_floor"]["plan"] for r in rs)}
        base = first.setdefault(quant, row)
        row["plan_s_vs_first"] = row["plan_s"] / base["plan_s"]
        row["x_floor_vs_first"] = row["plan_x_floor"] / base["plan_x_floor"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI smoke: tiny model, bf16, 2 rounds")
    p.add_argument("--models", nargs="+", default=["bench"])
    p.add_argument("--quants", nargs="+", default=["bf16", "rlsync_fp8/tensor", "rlsync_fp8/channel",
                                                    "rlsync_fp8/block"])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--processes", type=int, default=1,
                   help="run the (model, quant) list this many times, cycling, and summarize across processes")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per (model, quant) process")
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--together", action="store_true",
                   help="planned syncs only, every model's engine in one process per quant, alternating")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "QUANT"), help=argparse.SUPPRESS)
    p.add_argument("--child-together", nargs="+", metavar="QUANT_THEN_MODELS", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds: at least 1")
    if args.processes < 1:
        p.error("--processes: at least 1")
    if args.child:
        emit(measure(*args.child, args.rounds))
        return 0
    if args.child_together:
        emit(measure_together(args.child_together[0], args.child_together[1:], args.rounds))
        return 0
    if args.quick:
        args.models, args.quants, args.rounds = (["moe-tiny", "moe-tiny-e32"] if args.together else ["tiny"]), ["bf16"], 2
    if args.together and (len(args.models) < 2 or len(set(args.models)) != len(args.models)):
        p.error("--together: two or more distinct models")
    if args.together and args.processes != 1:
        p.error("--together runs one process per quant; --processes does not apply")
    env = environment(1)
    start = time.perf_counter()
    records = []
    if args.together:
        for quant in args.quants:
            cmd = [sys.executable, __file__, "--child-together", quant, *args.models, "--rounds", str(args.rounds)]
            records.append(run_child(cmd, {**os.environ, **SINGLE_THREAD_ENV}, args.timeout,
                                     model="+".join(args.models), quant=quant))
            print(f"{quant}: {records[-1].get('median_s', records[-1].get('error'))}", file=sys.stderr, flush=True)
        env["load_after"], env["wall_s"] = load_average(), time.perf_counter() - start
        result = {"env": env, "records": records}
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(result, indent=1))
        print(together_table(result))
        return 0 if all(r["status"] == "ok" for r in records) else 1
    for process in range(1, args.processes + 1):
        for model in args.models:
            for quant in args.quants:
                cmd = [sys.executable, __file__, "--child", model, quant, "--rounds", str(args.rounds)]
                record = run_child(cmd, {**os.environ, **SINGLE_THREAD_ENV}, args.timeout, model=model, quant=quant)
                records.append({**record, "process": process})
                print(f"[{process}/{args.processes}] {model} {quant}: "
                      f"{records[-1].get('median_s', records[-1].get('error'))}", file=sys.stderr, flush=True)
    env["load_after"], env["wall_s"] = load_average(), time.perf_counter() - start
    result = {"env": env, "records": records, "across_processes": across_processes(records)}
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
