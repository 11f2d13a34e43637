"""Resume trusts no checkpoint: crafted pickles never run, changed bytes are caught by the manifest's
sha256, a damaged archive falls back to the previous checkpoint, and no path leads out of the run directory."""

import hashlib
import json
import os

import pytest
import torch

from rlsync.errors import CheckpointError
from rlsync.rl import checkpoint
from rlsync.rl.resume import Checkpointer
from rlsync.rl.run import RunConfig, RunDir
from rlsync.rl.state import TrainState
from rlsync.rl.tasks import TaskConfig, make_task


class Payload:
    """Unpickling this calls `os.mkdir(marker)`: what a crafted checkpoint would do with `os.system`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


class RecordingEngine:
    """Stands in for the vLLM engine: records the steps it was synced at."""

    def __init__(self):
        self.synced = []

    def sync(self, source, step):
        self.synced.append(step)


def reseal(ckpt):
    """Rewrite the manifest to match the files as they are now (a crafted checkpoint passes the hash check)."""
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    for name in manifest["files"]:
        data = (ckpt / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / checkpoint.MANIFEST).write_text(json.dumps(manifest))


def flip_byte_of(path, tensor):
    """Flip one byte inside `tensor`'s stored bytes in checkpoint file `path` (same size, same archive)."""
    data = bytearray(path.read_bytes())
    offset = bytes(data).find(tensor.detach().numpy().tobytes())
    assert offset >= 0, "tensor bytes not found in the checkpoint"
    data[offset + 1] ^= 0xFF
    path.write_bytes(bytes(data))


def make_state(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return TrainState(modules={"policy": model}, optimizers={"policy": opt}, task=make_task(TaskConfig(), seed)), model


def train_and_checkpoint(tmp_path):
    """A run of 4 steps with checkpoints at 2 and 4; returns (run config, step-2 weight, step-4 weight)."""
    cfg = RunConfig(output_dir=str(tmp_path), name="run", checkpoint_every=2, keep_checkpoints=0)
    state, model = make_state(0)
    ckpt = Checkpointer(RunDir(cfg, {"x": 1}), cfg, state)
    weights = {}
    for step in range(1, 5):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        loss.backward()
        state.optimizers["policy"].step()
        state.optimizers["policy"].zero_grad()
        ckpt.maybe_save(step, final=step == 4)
        weights[step] = model.weight.detach().clone()
    return cfg, weights


def resume(cfg):
    state, model = make_state(123)
    engine = RecordingEngine()
    step = Checkpointer(RunDir(cfg, {"x": 1}, resume=True), cfg, state).resume(engine, source=None)
    return step, engine, model


def damage(kind, ckpt, weight, marker):
    state_file = ckpt / checkpoint.STATE_FILE
    if kind == "crafted_pickle":  # a well-formed archive, resealed, whose pickle calls os.mkdir
        torch.save({"step": 4, "modules": {}, "optimizers": {}, "ranks": [Payload(marker)]}, state_file)
        reseal(ckpt)
    elif kind == "flipped_tensor_byte":
        flip_byte_of(state_file, weight)
    elif kind == "damaged_archive_resealed":  # the manifest agrees: only the loader can tell
        data = bytearray(state_file.read_bytes())
        data[: 64] = bytes(64)
        state_file.write_bytes(bytes(data))
        reseal(ckpt)
    elif kind == "truncated":
        state_file.write_bytes(state_file.read_bytes()[:100])


WARNINGS = {
    "crafted_pickle": r"state.pt: not loadable as tensors and plain data \(UnpicklingError",
    "flipped_tensor_byte": "state.pt: sha256 does not match the manifest",
    "damaged_archive_resealed": "state.pt: not loadable as tensors and plain data",
    "truncated": "state.pt is 100 bytes",
}


@pytest.mark.parametrize("kind", list(WARNINGS))
def test_resume_falls_back_from_a_damaged_checkpoint_and_runs_nothing(tmp_path, kind):
    cfg, weights = train_and_checkpoint(tmp_path)
    marker = tmp_path / "payload-ran"
    damage(kind, tmp_path / "run" / "checkpoints" / "step_000004", weights[4], marker)
    with pytest.warns(UserWarning, match=f"skipping damaged checkpoint .*step_000004.*{WARNINGS[kind]}"):
        step, engine, model = resume(cfg)
    assert not marker.exists()  # the pickled call never ran
    assert step == 2 and engine.synced == [2]
    assert torch.equal(model.weight, weights[2])  # restored from the previous intact checkpoint


def test_the_crafted_payload_is_live_so_the_test_above_can_fail(tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"x": Payload(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)  # what checkpoint loading used to do
    assert marker.is_dir()


def test_a_flipped_byte_loads_silently_without_the_hash_check(tmp_path):
    _, weights = train_and_checkpoint(tmp_path)
    ckpt = tmp_path / "run" / "checkpoints" / "step_000004"
    flip_byte_of(ckpt / checkpoint.STATE_FILE, weights[4])
    loaded = torch.load(ckpt / checkpoint.STATE_FILE, weights_only=True)["modules"]["policy"]["weight"]
    assert not torch.equal(loaded, weights[4])  # torch itself does not notice
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        checkpoint.load_checkpoint(ckpt)


def test_resume_refuses_when_no_checkpoint_is_intact(tmp_path):
    cfg, weights = train_and_checkpoint(tmp_path)
    for step in (2, 4):
        flip_byte_of(tmp_path / "run" / "checkpoints" / f"step_{step:06d}" / checkpoint.STATE_FILE, weights[step])
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no intact checkpoint .*step_000004.*step_000002"):
        resume(cfg)


def test_a_latest_pointer_out_of_the_run_directory_is_refused(tmp_path):
    cfg, _ = train_and_checkpoint(tmp_path)
    outside = checkpoint.save_checkpoint(tmp_path / "outside", 6, {"step": 6})  # complete and intact
    root = tmp_path / "run" / "checkpoints"
    (root / "latest").write_text(os.path.relpath(outside, root) + "\n")  # ../../outside/checkpoints/step_000006
    for find in (checkpoint.find_latest, checkpoint.load_latest):
        with pytest.raises(CheckpointError, match=r"latest holds '\.\./\.\./outside/checkpoints/step_000006'"):
            find(tmp_path / "run")
    engine = RecordingEngine()
    state, model = make_state(123)
    before = model.weight.detach().clone()
    with pytest.raises(CheckpointError, match="refusing to follow it"):
        Checkpointer(RunDir(cfg, {"x": 1}, resume=True), cfg, state).resume(engine, source=None)
    assert engine.synced == [] and torch.equal(model.weight, before)


@pytest.mark.parametrize("link", ["step_dir", "checkpoints_dir"])
def test_checkpoint_paths_that_resolve_outside_the_run_directory_are_refused(tmp_path, link):
    outside = checkpoint.save_checkpoint(tmp_path / "outside", 8, {"step": 8})
    run = tmp_path / "run"
    if link == "step_dir":
        checkpoint.save_checkpoint(run, 2, {"step": 2})
        (run / "checkpoints" / "step_000008").symlink_to(outside, target_is_directory=True)
    else:
        run.mkdir()
        (run / "checkpoints").symlink_to(outside.parent, target_is_directory=True)
    for call in (checkpoint.find_latest, checkpoint.load_latest,
                 lambda path: checkpoint.save_checkpoint(path, 10, {"step": 10})):
        with pytest.raises(CheckpointError, match="outside"):
            call(run)
    assert not (outside.parent / "step_000010").exists()
