"""`run.report_to`: TensorBoard, wandb and trackio get every logged metric under the shared `train/` names, each
checked in the library's own local store (wandb offline, trackio's local database, TensorBoard event files); a
tracker that is misnamed, named twice or not installed is refused when the config loads."""

import json
import sys
from pathlib import Path

import pytest

from rlsync.cli import load_recipe_config
from rlsync.errors import ConfigError
from rlsync.rl.run import RunConfig, RunDir, read_metrics
from tests.unit.tracking_support import (tensorboard_scalars, trackio_logs, wandb_history, wandb_offline_runs,
                                         wandb_run_info)

ROOT = Path(__file__).resolve().parents[2]
GRPO = ROOT / "configs/grpo/tiny_cpu_fp8.yaml"
STEPS = [{"reward": 0.25, "sync/seconds": 1.5}, {"reward": 0.5, "sync/seconds": 0.125},
         {"reward": 0.75, "sync/seconds": 0.0625, "sync/verified": 1.0}]


def test_report_to_is_checked_when_the_config_loads(monkeypatch):
    _, cfg = load_recipe_config(GRPO, ["run.report_to=[tensorboard, wandb, trackio]"])
    assert cfg.run.report_to == ["tensorboard", "wandb", "trackio"] and cfg.run.project == "rlsync"
    with pytest.raises(ConfigError, match=r"run\.report_to.*'mlflow'.*tensorboard"):
        load_recipe_config(GRPO, ["run.report_to=[mlflow]"])
    with pytest.raises(ConfigError, match=r"run\.report_to: 'wandb' is named twice"):
        load_recipe_config(GRPO, ["run.report_to=[wandb, wandb]"])
    with pytest.raises(ConfigError, match="run.project must not be empty"):
        load_recipe_config(GRPO, ["run.report_to=[trackio]", "run.project=' '"])
    for name, extra in (("wandb", "tracking"), ("trackio", "tracking"), ("tensorboard", "plot")):
        monkeypatch.setitem(sys.modules, name, None)  # what `import name` finds when it is not installed
        with pytest.raises(ConfigError, match=rf"run\.report_to: '{name}' needs the {name} package, which is not "
                                              rf"installed \(pip install 'rlsync\[{extra}\]'"):
            load_recipe_config(GRPO, [f"run.report_to=[{name}]"])


def test_every_tracker_gets_every_metric_under_the_shared_names(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_DIR", raising=False)  # wandb's files go to the run directory; WANDB_MODE=offline
    project = f"rlsync-test-{tmp_path.name}"
    config = RunConfig(output_dir=str(tmp_path), name="r", report_to=["tensorboard", "wandb", "trackio"],
                       project=project)
    with RunDir(config, {"grpo": {"lr": 0.5}}) as run:
        run.open_trackers()
        for step, metrics in enumerate(STEPS, start=1):
            run.log(step, metrics)
    expected = [{f"train/{k}": v for k, v in m.items()} | {"train/global_step": s} for s, m in enumerate(STEPS, 1)]

    assert [{k: v for k, v in r.items() if k not in ("step", "time")} for r in read_metrics(run.path)] == STEPS

    (wandb_file,) = wandb_offline_runs(run.path)
    assert wandb_history(wandb_file) == expected
    info = wandb_run_info(wandb_file)
    assert (info["project"], info["name"], info["config"]["grpo"]) == (project, "r", {"lr": 0.5})

    rows = trackio_logs(project, "r")
    assert [row.pop("step") for row in rows] == [1, 2, 3] and rows == expected

    scalars = tensorboard_scalars(run.path / "tensorboard")
    assert scalars.keys() == {"train/reward", "train/sync/seconds", "train/sync/verified"}
    assert scalars["train/reward"] == [(1, 0.25), (2, 0.5), (3, 0.75)]  # exact in float32
    assert scalars["train/sync/verified"] == [(3, 1.0)]


def test_a_resume_drops_tensorboard_events_after_its_checkpoint(tmp_path):
    config = RunConfig(output_dir=str(tmp_path), name="r", report_to=["tensorboard"])
    with RunDir(config, {}) as run:
        run.open_trackers()
        for step, metrics in enumerate(STEPS, start=1):
            run.log(step, metrics)
    with RunDir(config, {}, resume=True) as run:  # resumed from a checkpoint at step 1: steps 2, 3 again
        run.truncate_after(1)
        run.open_trackers(purge_step=2)
        run.log(2, {"reward": 0.0})
    assert tensorboard_scalars(run.path / "tensorboard")["train/reward"] == [(1, 0.25), (2, 0.0)]
    assert [json.dumps(r["reward"]) for r in read_metrics(run.path)] == ["0.25", "0.0"]
