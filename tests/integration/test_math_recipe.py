"""The math config runs end to end on CPU: GSM8K-format records from the shipped sample, rewards from math-verify,
`success` logged each step, FP8 syncs verified, the task's draw saved in the checkpoint."""

from pathlib import Path

import pytest

from rlsync.cli import load_recipe_config
from rlsync.rl import checkpoint
from rlsync.rl.run import read_metrics

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_tiny_math_config_runs_and_logs_success(tmp_path):
    steps, prompts = 2, 2
    module, cfg = load_recipe_config(ROOT / "configs/grpo/tiny_cpu_math.yaml", [
        f"grpo.steps={steps}", f"grpo.prompts_per_step={prompts}", "grpo.group_size=2", "sync.verify_every=2",
        f"run.checkpoint_every={steps}", f"run.output_dir={tmp_path}", "run.name=m", "run.progress=false"])
    assert cfg.task.name == "gsm8k" and cfg.task.dataset is None and cfg.model.path is None
    run = module.main(cfg)
    records = read_metrics(run.path)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:  # the reward is the math reward alone, so it is the fraction judged right
        assert 0.0 <= r["success"] <= 1.0 and r["reward"] == r["success"]
    assert records[-1]["sync/verified"] == 1.0
    _, state = checkpoint.load_latest(run.path)
    assert state["ranks"][0]["task"] == {"epoch": 0, "position": steps * prompts, "num_records": 128}
