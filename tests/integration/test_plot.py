"""`rlsync plot RUN_DIR` draws a real run's curves; TensorBoard gets the same scalars."""

from pathlib import Path

import matplotlib.pyplot as plt

from rlsync.cli import load_recipe_config, main
from rlsync.rl.plot import figure
from rlsync.rl.run import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def test_plot_and_tensorboard_from_a_real_run(tmp_path, capsys):
    module, cfg = load_recipe_config(
        ROOT / "configs/grpo/tiny_cpu_fp8.yaml",
        ["grpo.steps=2", "grpo.prompts_per_step=2", "grpo.group_size=2", f"run.output_dir={tmp_path}", "run.name=p",
         "run.report_to=[tensorboard]", "run.checkpoint_every=0", "run.progress=false", "sync.verify_every=0"],
    )
    run_dir = module.main(cfg).path
    assert len(read_metrics(run_dir)) == 2

    assert main(["plot", str(run_dir)]) == 0
    fig = figure(read_metrics(run_dir), title="p")
    assert [ax.get_title() for ax in fig.axes] == ["reward", "KL / mismatch", "sync seconds (log scale)"]
    assert [line.get_label() for line in fig.axes[1].get_lines()] == ["logprob_mismatch"]
    plt.close(fig)
    png = run_dir / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert f"wrote {png}" in capsys.readouterr().out
    out = tmp_path / "elsewhere.png"
    assert main(["plot", str(run_dir), "--out", str(out)]) == 0 and out.exists()
    assert main(["plot", str(tmp_path / "not-a-run")]) == 2
    assert "does not exist" in capsys.readouterr().err

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    rewards = events.Scalars("train/reward")  # every tracker's name: train/<metrics.jsonl key>
    assert [e.step for e in rewards] == [1, 2]
    assert [e.value for e in rewards] == [r["reward"] for r in read_metrics(run_dir)]
    assert "train/sync/seconds" in events.Tags()["scalars"]
