"""The shipped GRPO config learns its task with FP8 rollouts, on CPU, in seconds."""

from pathlib import Path

import pytest

from rlsync.cli import load_recipe_config
from rlsync.rl.run import read_metrics

ROOT = Path(__file__).resolve().parents[2]
# Measured on this 2-core CPU with seed 0: mean reward ~0.2 over steps 1-4 and
# ~0.9 over steps 13-16. Asserting a 0.3 gap leaves wide room for noise while
# failing for a policy that does not learn (random play scores ~0.08 throughout).
MARGIN = 0.3


@pytest.mark.slow
def test_grpo_reward_rises(tmp_path):
    module, cfg = load_recipe_config(
        ROOT / "configs/grpo/tiny_cpu_fp8.yaml",
        ["grpo.steps=16", f"run.output_dir={tmp_path}", "run.name=t", "sync.verify_every=4"],
    )
    run = module.main(cfg)
    records = read_metrics(run.path)
    assert [r["step"] for r in records] == list(range(1, 17))
    first = sum(r["reward"] for r in records[:4]) / 4
    last = sum(r["reward"] for r in records[-4:]) / 4
    assert last > first + MARGIN, f"reward {first:.3f} -> {last:.3f}"
    for r in records:
        for key in ("loss", "sync/seconds", "sync/gbps", "logprob_mismatch", "reward"):
            assert key in r and r[key] == r[key], (key, r)  # present and not NaN
    assert [r["sync/verified"] for r in records if "sync/verified" in r] == [1.0] * 4
    assert (run.path / "config.yaml").exists()
