"""`benchmarks/sync.py --quick` runs end to end, so the benchmark never rots.

It runs the real script (the parent, two method subprocesses, the floor) on
the tiny model and checks what a reader of its table relies on: every method
succeeded, the engine held exactly the trainer's weights after rlsync's sync,
and the figures are real measurements (positive times, bytes equal to the
checkpoint's). Timings themselves are not asserted: this machine is shared.
"""

import copy
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import launch

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_sync_benchmark_quick(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sync.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (model,) = result["models"]
    records = {r["method"]: r for r in model["records"]}
    assert set(records) == {"rlsync", "native"}
    for method, r in records.items():
        assert r["status"] == "ok", (method, r.get("error"))
        assert r["num_bytes"] == model["facts"]["num_bytes"]
        assert len(r["times_s"]) == 2 and all(t > 0 for t in r["times_s"])
        assert r["peak_rss_bytes"] >= 0
    assert records["rlsync"]["verify"].startswith("ok")
    # rlsync's backend counts its load-format bytes: at most one layer (or the embedding). Zero where vLLM keeps
    # bf16 linear weights as they load (CPUs without AVX-512: oneDNN has no bf16 matmul, every layer loads in place).
    facts = model["facts"]
    assert 0 <= records["rlsync"]["peak_live_bytes"] <= max(facts["layer_bytes"], facts["max_tensor_bytes"])
    assert records["rlsync"]["peak_live_bytes"] is not None
    assert model["floor_s"]["bf16"] > 0
    # "(plan)": the timed syncs replayed the sync plan the first one recorded
    assert "| bf16 | rlsync (plan) |" in proc.stdout and "| bf16 | native |" in proc.stdout


def test_plan_ab_benchmark_quick(tmp_path):
    """plan_ab.py times plan / no plan / recording syncs and the floor on one engine, checks each sync's
    `planned`, and verifies the engine at the end."""
    out = tmp_path / "ab.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "plan_ab.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = json.loads(out.read_text())["records"]
    assert record["status"] == "ok" and record["verify"].startswith("ok"), record.get("error")
    assert all(len(record["times_s"][m]) == 2 and min(record["times_s"][m]) > 0 for m in ("plan", "noplan", "record", "floor"))
    assert record["record_vs_noplan"] > 0 and record["x_floor"]["plan"] > 0
    assert "| tiny | bf16 |" in proc.stdout


def test_plan_ab_together_quick(tmp_path):
    """`--together`: both tiny MoE models' engines in one process, planned syncs alternating, each verified; the
    first model's ratio to itself is 1."""
    out = tmp_path / "together.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "plan_ab.py"), "--quick", "--together", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = json.loads(out.read_text())["records"]
    assert record["status"] == "ok", record.get("error")
    assert record["models"] == ["moe-tiny", "moe-tiny-e32"]
    assert all(len(record["times_s"][m]) == 2 and min(record["times_s"][m]) > 0 for m in record["models"])
    assert record["vs_first"]["moe-tiny"] == 1.0 and record["vs_first"]["moe-tiny-e32"] > 0
    assert all(v.startswith("ok") for v in record["verify"].values())
    assert "| bf16 | moe-tiny-e32 |" in proc.stdout


def test_kernel_ab_benchmark_quick(tmp_path):
    """kernel_ab.py builds HEAD's kernel and this checkout's, times both on every path, reports after / before."""
    out = tmp_path / "k.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_ab.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["scheme"] for r in rows} == {"channel", "tensor", "block"}
    assert all(r["before_s"] > 0 and r["after_s"] > 0 for r in rows)
    assert "| channel | 16 x 256 x 32 |" in proc.stdout


def test_plan_ab_summarizes_each_model_across_processes():
    """`--processes N`: per (model, quant) the median over processes, and the ratio to the list's first model."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import plan_ab
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def rec(model, quant, plan_s, x_floor, process):
        return {"status": "ok", "model": model, "quant": quant, "process": process,
                "median_s": {"plan": plan_s}, "x_floor": {"plan": x_floor}}

    one = [rec("moe-e8", "bf16", 1.0, 2.0, 1), rec("moe-e256", "bf16", 1.3, 2.4, 1)]
    assert plan_ab.across_processes(one) == []  # one process each: nothing to summarize
    runs = [*one, rec("moe-e8", "bf16", 1.2, 2.2, 2), rec("moe-e256", "bf16", 1.2, 2.6, 2),
            rec("moe-e8", "bf16", 9.0, 9.0, 3), {"status": "failed", "model": "moe-e256", "quant": "bf16"}]
    e8, e256 = plan_ab.across_processes(runs)
    assert (e8["processes"], e8["plan_s"], e8["plan_x_floor"], e8["plan_s_vs_first"]) == (3, 1.2, 2.2, 1.0)
    assert (e256["processes"], e256["plan_s"], e256["plan_x_floor"]) == (2, 1.25, 2.5)
    assert e256["plan_s_vs_first"] == pytest.approx(1.25 / 1.2) and e256["x_floor_vs_first"] == pytest.approx(2.5 / 2.2)


def test_sync_benchmark_moe_quick(tmp_path):
    """`--moe --quick`: a tiny Qwen3-MoE, rlsync (bf16, FP8 channel), and the expert series."""
    out = tmp_path / "moe.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sync.py"), "--moe", "--quick", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["env"]["omp_num_threads"] == "1"
    models = {m["name"]: m for m in result["models"]}
    assert set(models) == {"moe-tiny", "moe-tiny-e32"}
    main = {(r["quant"], r["method"]): r for r in models["moe-tiny"]["records"]}
    assert set(main) == {("bf16", "rlsync"), ("rlsync_fp8/channel", "rlsync")}
    for key, r in main.items():
        assert r["status"] == "ok", (key, r.get("error"))
        assert r["num_bytes"] == models["moe-tiny"]["facts"]["num_bytes"]
        assert all(t > 0 for t in r["times_s"]) and r["cpu_median_s"] > 0
    # rlsync's sync is exact, experts included
    assert main[("bf16", "rlsync")]["verify"].startswith("ok")
    assert main[("rlsync_fp8/channel", "rlsync")]["verify"].startswith("ok")
    # The series keeps the expert bytes and multiplies the tensors: 8 -> 32 experts per layer, 3 tensors each;
    # only the router gates (experts x hidden, bf16) grow with the count.
    (e32,) = models["moe-tiny-e32"]["records"]
    e8 = main[("bf16", "rlsync")]
    spec = models["moe-tiny-e32"]["spec"]
    assert e32["status"] == "ok" and e32["verify"].startswith("ok")
    assert e32["num_bytes"] - e8["num_bytes"] == spec["num_hidden_layers"] * (32 - 8) * spec["hidden_size"] * 2
    assert e32["num_tensors"] - e8["num_tensors"] == spec["num_hidden_layers"] * 3 * (32 - 8)
    assert "**MoE main table**" in proc.stdout and "**MoE scaling**" in proc.stdout
    assert "| bf16 | rlsync | 32 x 32 |" in proc.stdout


def _run_quick(script: str, out: Path) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _benchmark_module(name: str):
    """A benchmark script as a module (its table printer), loaded from its file."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def test_tp_benchmark_quick(tmp_path):
    """`tp.py --quick`: one TP-2 engine of the tiny model over two torchrun ranks; each rank received the full
    tensors, replayed its sync plan, verified its own shard and holds about half the model."""
    with launch.tp_engines_alone():  # no other TP engine on the machine meanwhile (see there)
        result, table = _run_quick("tp.py", tmp_path / "tp.json")
    (record,) = result["records"]
    assert (record["quant"], record["tp"], record["status"]) == ("bf16", 2, "ok"), record.get("error")
    assert [(k["tp_rank"], k["tp_size"]) for k in record["ranks"]] == [(0, 2), (1, 2)]
    full = result["facts"]["num_bytes"]
    for k in record["ranks"]:
        assert k["received_bytes"] == full
        assert full / 2 <= k["engine_bytes"] < 0.6 * full  # its half, plus replicated norms
        assert len(k["times_s"]) == 2 and all(t > 0 for t in k["times_s"]) and all(k["planned"][1:])
        assert k["verify"].startswith("ok") and k["shard_floor_s"] > 0 and k["full_read_floor_s"] > 0
    assert "| bf16 | 2 |" in table
    # The printer's TP 2 / TP 1 column, on this record and a TP-1 one twice as slow (the smoke skips that launch).
    tp1 = copy.deepcopy(record)
    tp1["tp"] = 1
    for k in tp1["ranks"]:
        k["times_s"], k["cpu_times_s"] = [2 * t for t in k["times_s"]], [4 * t for t in k["cpu_times_s"]]
    result["records"].insert(0, tp1)
    assert re.search(r"\| bf16 \| 2 \|( [^|]+ \|){8} 0\.50 / 0\.25 \|", _benchmark_module("tp").format_table(result))


def test_build_memory_benchmark_quick(tmp_path):
    """`build_memory.py --quick`: an `rlsync_fp8` build of the tiny model in its own process; the plugin built
    every layer on arrival, and the engine holds fewer bytes than the bf16 checkpoint."""
    result, table = _run_quick("build_memory.py", tmp_path / "mem.json")
    (record,) = result["records"]
    assert (record["quant"], record["status"]) == ("rlsync_fp8/channel", "ok"), record.get("error")
    assert record["built_on_arrival"] == record["num_plugin_layers"] > 0
    assert record["engine_bytes"] < result["facts"]["num_bytes"]
    assert record["num_samples"] > 0 and record["load_s"] > 0 and record["build_peak_rss_bytes"] > 0
    assert f"| {record['num_plugin_layers']} / {record['num_plugin_layers']} |" in table
    # The printer's ratios, on this record and a bf16 one with twice its peaks (the smoke skips that build).
    peaks = ("load_peak_anon_bytes", "load_peak_rss_bytes", "build_peak_anon_bytes", "build_peak_rss_bytes")
    record.update({key: 2**20 for key in peaks})
    result["records"].insert(0, {**record, "quant": "bf16", "num_plugin_layers": 0, **{key: 2**21 for key in peaks}})
    assert "- rlsync_fp8/channel / bf16: load peak anon 0.50" in _benchmark_module("build_memory").format_table(result)
