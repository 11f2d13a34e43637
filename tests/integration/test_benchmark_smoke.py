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
    assert "| bf16 | rlsync |" in proc.stdout and "| bf16 | native |" in proc.stdout
