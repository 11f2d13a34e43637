"""The shipped GRPO config learns its task with FP8 rollouts, on CPU, in seconds; a diverging run stops."""

from pathlib import Path

import pytest
import torch

from rlsync.cli import load_recipe_config, main
from rlsync.rl import checkpoint, grpo
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


def test_a_diverging_run_stops_naming_the_step_and_checkpoints_no_poisoned_weights(tmp_path, monkeypatch, capsys):
    # step 2's loss is finite but its gradient is infinite (d sqrt(x) at 0): what an overflowing update looks like
    real_loss, calls = grpo.policy_loss, []

    def poisoned(logp, *args, **kwargs):
        loss, stats = real_loss(logp, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            loss = loss + torch.sqrt(logp.sum() - logp.sum().detach())
        return loss, stats

    monkeypatch.setattr(grpo, "policy_loss", poisoned)
    status = main(["run", str(ROOT / "configs/grpo/tiny_cpu_fp8.yaml"), f"run.output_dir={tmp_path}", "run.name=d",
                   "grpo.steps=3", "grpo.prompts_per_step=2", "grpo.group_size=2", "run.checkpoint_every=1",
                   "run.keep_checkpoints=0", "sync.verify_every=0", "run.progress=false"])
    assert status == 1
    assert "DivergenceError: step 2: the gradient norm is" in capsys.readouterr().err
    run = tmp_path / "d"
    assert [r["step"] for r in read_metrics(run)] == [1]
    assert [p.name for p in checkpoint.step_dirs(checkpoint.checkpoint_dir(run))] == ["step_000001"]
    state = checkpoint.load_checkpoint(checkpoint.checkpoint_dir(run) / "step_000001")
    weights = state["modules"]["policy"]
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
