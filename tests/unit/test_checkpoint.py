"""Atomic checkpoints, interrupted writes, train-state round trips, run-directory rules."""

import json
import random

import pytest
import torch

from rlsync.errors import CheckpointError, ConfigError
from rlsync.rl import checkpoint
from rlsync.rl.run import MARKER, RunConfig, RunDir, read_metrics
from rlsync.rl.state import TrainState, step_seed
from rlsync.rl.tasks import TaskConfig, make_task


def _state(step):
    return {"step": step, "w": torch.full((3,), float(step))}


def test_save_writes_manifest_pointer_and_prunes(tmp_path):
    for step in (2, 4, 6):
        checkpoint.save_checkpoint(tmp_path, step, _state(step), keep=2)
    root = checkpoint.checkpoint_dir(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000004", "step_000006"]
    assert (root / "latest").read_text().strip() == "step_000006"
    latest = checkpoint.find_latest(tmp_path, verify_hashes=True)
    assert latest.name == "step_000006" and checkpoint.checkpoint_step(latest) == 6
    assert torch.equal(checkpoint.load_checkpoint(latest)["w"], torch.full((3,), 6.0))
    manifest = json.loads((latest / checkpoint.MANIFEST).read_text())
    assert manifest["step"] == 6 and manifest["files"]["state.pt"]["bytes"] == (latest / "state.pt").stat().st_size


def test_a_write_killed_midway_leaves_the_previous_checkpoint_latest(tmp_path, monkeypatch):
    checkpoint.save_checkpoint(tmp_path, 2, _state(2))
    real_save = torch.save

    def dying_save(obj, f):  # writes part of the file, then the process "dies"
        real_save(obj, f)
        f.truncate(10)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, 4, _state(4))
    monkeypatch.undo()
    root = checkpoint.checkpoint_dir(tmp_path)
    assert any(p.name.startswith(".tmp-step_000004") for p in root.iterdir())  # the partial write is on disk
    latest = checkpoint.find_latest(tmp_path)
    assert latest.name == "step_000002"
    assert checkpoint.load_checkpoint(latest)["step"] == 2


@pytest.mark.parametrize("damage", ["no_manifest", "truncated_state", "bad_manifest", "missing_state"])
def test_a_damaged_checkpoint_is_skipped_even_if_latest_names_it(tmp_path, damage):
    checkpoint.save_checkpoint(tmp_path, 2, _state(2), keep=0)
    bad = checkpoint.save_checkpoint(tmp_path, 4, _state(4), keep=0)
    if damage == "no_manifest":
        (bad / checkpoint.MANIFEST).unlink()
    elif damage == "truncated_state":
        data = (bad / "state.pt").read_bytes()
        (bad / "state.pt").write_bytes(data[: len(data) // 2])
    elif damage == "bad_manifest":
        (bad / checkpoint.MANIFEST).write_text("{not json")
    else:
        (bad / "state.pt").unlink()
    assert (checkpoint.checkpoint_dir(tmp_path) / "latest").read_text().strip() == bad.name
    assert checkpoint.find_latest(tmp_path).name == "step_000002"
    with pytest.raises(CheckpointError, match="step_000004: "):
        checkpoint.load_checkpoint(bad)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*step_000004"):
        path, state = checkpoint.load_latest(tmp_path)
    assert path.name == "step_000002" and state["step"] == 2


def test_hash_verification_catches_same_size_corruption(tmp_path):
    checkpoint.save_checkpoint(tmp_path, 2, _state(2), keep=0)
    bad = checkpoint.save_checkpoint(tmp_path, 4, _state(4), keep=0)
    data = bytearray((bad / "state.pt").read_bytes())
    data[-20] ^= 0xFF
    (bad / "state.pt").write_bytes(bytes(data))
    assert checkpoint.find_latest(tmp_path).name == "step_000004"  # sizes match
    assert checkpoint.find_latest(tmp_path, verify_hashes=True).name == "step_000002"


def test_no_checkpoint_at_all(tmp_path):
    assert checkpoint.find_latest(tmp_path) is None
    (checkpoint.checkpoint_dir(tmp_path) / "step_000003").mkdir(parents=True)  # partial, no manifest
    assert checkpoint.find_latest(tmp_path) is None


def _train_state(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    task = make_task(TaskConfig(), seed=seed)
    return TrainState(modules={"policy": model}, optimizers={"policy": opt}, task=task), model, opt, task


def _train_step(model, opt):
    x = torch.randn(8, 4)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def test_train_state_round_trip_continues_exactly():
    state, model, opt, task = _train_state(0)
    for _ in range(3):
        _train_step(model, opt)
    task.prompts(5)
    random.random()
    saved = state.state_dict(step=3)
    expected = ([_train_step(model, opt) for _ in range(2)], task.prompts(3), random.random())

    restored, model2, opt2, task2 = _train_state(123)  # different init, RNG and task seed
    assert restored.load_state_dict(saved) == 3
    got = ([_train_step(model2, opt2) for _ in range(2)], task2.prompts(3), random.random())
    assert got == expected  # bit-identical losses, same prompts, same Python RNG draw


def test_train_state_refuses_a_checkpoint_without_its_modules():
    state, *_ = _train_state(0)
    saved = state.state_dict(step=1)
    del saved["modules"]["policy"]
    with pytest.raises(ConfigError, match="no state for"):
        state.load_state_dict(saved)


def test_step_seed_is_stable_and_distinct():
    assert step_seed(0, 1) == step_seed(0, 1)
    seeds = {step_seed(s, t) for s in range(5) for t in range(200)}
    assert len(seeds) == 1000 and all(0 <= s < 2**31 for s in seeds)


def test_run_dir_refuses_to_clobber_checkpoints_and_checks_resumed_config(tmp_path):
    cfg = RunConfig(output_dir=str(tmp_path), name="r")
    run = RunDir(cfg, {"run": {"seed": 0}, "grpo": {"lr": 0.1, "steps": 4}})
    for step in (1, 2, 3):
        run.log(step, {"reward": float(step)})
    checkpoint.save_checkpoint(run.path, 2, _state(2))
    with pytest.raises(ConfigError, match="run.name: .* already holds checkpoints; pass resume=true"):
        RunDir(cfg, {"run": {"seed": 0}, "grpo": {"lr": 0.1, "steps": 4}})
    with pytest.raises(ConfigError, match=r"grpo.lr: 0.1 -> 0.2"):
        RunDir(cfg, {"run": {"seed": 0}, "grpo": {"lr": 0.2, "steps": 4}}, resume=True)
    resumed = RunDir(cfg, {"run": {"seed": 0}, "grpo": {"lr": 0.1, "steps": 8}}, resume=True)  # steps may change
    resumed.truncate_after(2)
    assert [r["step"] for r in read_metrics(run.path)] == [1, 2]
    with pytest.warns(UserWarning, match="deleting the old run directory"):
        RunDir(RunConfig(output_dir=str(tmp_path), name="r", overwrite=True), {"x": 1})
    assert not checkpoint.checkpoint_dir(run.path).exists() and not run.metrics_path.exists()
    assert (run.path / MARKER).is_file()


def test_run_dir_marks_what_it_creates_and_touches_nothing_else(tmp_path):
    foreign = tmp_path / "theirs"
    (foreign / "checkpoints").mkdir(parents=True)
    (foreign / "checkpoints" / "model.pt").write_bytes(b"not ours")
    for overwrite, resume, key in ((True, False, "run.overwrite"), (False, False, "run.name"), (False, True, "run.name")):
        with pytest.raises(ConfigError, match=f"{key}: {foreign} exists and was not created by rlsync"):
            RunDir(RunConfig(output_dir=str(tmp_path), name="theirs", overwrite=overwrite), {"x": 1}, resume=resume)
    assert sorted(p.name for p in foreign.rglob("*")) == ["checkpoints", "model.pt"]
    (tmp_path / "empty").mkdir()  # an empty directory is adopted and marked
    assert (RunDir(RunConfig(output_dir=str(tmp_path), name="empty"), {"x": 1}).path / MARKER).is_file()


def test_run_dir_closes_when_the_run_raises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with RunDir(RunConfig(output_dir=str(tmp_path), name="r", report_to=["tensorboard"]), {"x": 1}) as run:
            run.open_trackers()
            run.log(1, {"reward": 0.5})
            raise RuntimeError("boom")
    assert run._trackers == []  # closed: their events are flushed
    assert list((run.path / "tensorboard").iterdir()) and read_metrics(run.path)[0]["reward"] == 0.5
