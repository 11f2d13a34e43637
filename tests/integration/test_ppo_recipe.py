"""The shipped PPO config learns its task with FP8 rollouts on CPU, and its critic learns too."""

from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from rlsync.cli import load_recipe_config
from rlsync.default_model import tiny_model_path
from rlsync.rl.export import checkpoint_tensors, compare_tensors, export_info
from rlsync.rl.plot import VALUE_KEYS, figure
from rlsync.rl.run import read_metrics

ROOT = Path(__file__).resolve().parents[2]
# Random play scores ~0.08. Measured with seed 0 on this 2-core CPU, 24 steps with
# the shipped rlsync_fp8 (channel) rollouts: mean reward 0.07 over steps 1-4 and
# 0.82 over steps 21-24 (vLLM's fp8_per_channel: 0.14 -> 0.77; PPO's curve is
# noisier than GRPO's, hence more steps). A 0.3 gap leaves wide room for noise
# and still fails a policy that does not learn.
REWARD_MARGIN = 0.3
VALUE_ERROR_END = 0.3


@pytest.mark.slow
def test_ppo_reward_rises_and_value_error_falls(tmp_path):
    module, cfg = load_recipe_config(
        ROOT / "configs/ppo/tiny_cpu_fp8.yaml",
        ["ppo.steps=24", f"run.output_dir={tmp_path}", "run.name=t", "sync.verify_every=12", "run.checkpoint_every=24",
         "run.progress=false", "run.export=true"],
    )
    run = module.main(cfg).path
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 25))
    mean = lambda key, rs: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    first, last = mean("reward", records[:4]), mean("reward", records[-4:])
    assert last > first + REWARD_MARGIN, f"reward {first:.3f} -> {last:.3f}"
    # The critic's error on fresh rollouts, relative to the zero critic it starts as
    # (E[(V - R)^2] / E[R^2]; the raw value loss grows with the rewards), must fall.
    errors = [r["value_error"] for r in records]
    assert errors[0] == 1.0 and mean("value_error", records[-4:]) < VALUE_ERROR_END, errors
    for r in records:
        for key in ("loss", "policy_loss", "value_loss", "logprob_mismatch", "clip_fraction", "sync/seconds"):
            assert key in r and r[key] == r[key], (key, r)  # present and not NaN
    assert [r["sync/verified"] for r in records if "sync/verified" in r] == [1.0, 1.0]

    # its plot: the shared panels, the two verified syncs ringed, and the value head's panel
    fig = figure(records, title="t")
    panels = {ax.get_title(): ax for ax in fig.axes}
    plt.close(fig)
    assert list(panels) == ["reward", "KL / mismatch", "sync seconds (log scale)", "value head (PPO)"]
    assert [line.get_label() for line in panels["value head (PPO)"].get_lines()] == list(VALUE_KEYS)
    (rings,) = panels["sync seconds (log scale)"].collections
    assert rings.get_offsets()[:, 0].tolist() == [12, 24]
    # run.export: the final policy (not the value head) in the base checkpoint's format
    assert export_info(run / "export")["step"] == 24
    assert compare_tensors(checkpoint_tensors(run / "export"), checkpoint_tensors(tiny_model_path())) == []
