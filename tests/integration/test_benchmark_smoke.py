"""`benchmarks/sync.py --quick` runs end to end, so the benchmark never rots.

It runs the real script (the parent, two method subprocesses, the floor) on
the tiny model and checks what a reader of its table relies on: every method
succeeded, the engine held exactly the trainer's weights after rlsync's sync,
and the figures are real measurements (positive times, bytes equal to the
checkpoint's). Timings themselves are not asserted: this machine is shared.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_sync_benchmark_moe_quick(tmp_path):
    """`--moe --quick`: a tiny Qwen3-MoE, rlsync (bf16, FP8 channel) vs vLLM's native bf16, and the expert series."""
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
    assert set(main) == {("bf16", "rlsync"), ("bf16", "native"), ("rlsync_fp8/channel", "rlsync")}
    for key, r in main.items():
        assert r["status"] == "ok", (key, r.get("error"))
        assert r["num_bytes"] == models["moe-tiny"]["facts"]["num_bytes"]
        assert all(t > 0 for t in r["times_s"]) and r["cpu_median_s"] > 0
    # rlsync's sync is exact, experts included; native's outcome is a result either way (vLLM 0.32 skips the
    # CPU experts' prepack on reload), so it is only required to be recorded.
    assert main[("bf16", "rlsync")]["verify"].startswith("ok")
    assert main[("rlsync_fp8/channel", "rlsync")]["verify"].startswith("ok")
    assert main[("bf16", "native")]["verify"]
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
