"""Resume: a run stopped after step k and resumed reaches exactly the metrics of an uninterrupted run.

Tolerance: exact equality of every metric that does not measure wall time
(rewards, losses, log-prob mismatch, clip fractions, grad norms, value errors,
sync byte counts). It holds because rollouts are seeded per (run seed, step),
the policy, optimizer, RNG and task state are restored bit for bit, the
restored policy is synced into the fresh engine before the first rollout, and
CPU kernels are deterministic for identical inputs and batch shapes.
"""

import importlib
from pathlib import Path

import pytest
import torch

from rlsync.cli import RECIPES, load_recipe_config
from rlsync.rl import checkpoint
from rlsync.rl.run import RunDir, read_metrics

ROOT = Path(__file__).resolve().parents[2]
WALL_TIME = {"time", "step_seconds", "sync/seconds", "sync/gbps"}
SMALL = {
    "grpo": ["grpo.steps=4", "grpo.prompts_per_step=4", "grpo.group_size=4"],
    "ppo": ["ppo.steps=3", "ppo.prompts_per_step=4", "ppo.samples_per_prompt=2"],
}


class Killed(BaseException):
    """Stands in for the process dying (not an Exception: nothing may swallow it)."""


def run(recipe, tmp_path, name, *extra):
    module, cfg = load_recipe_config(
        ROOT / f"configs/{recipe}/tiny_cpu_fp8.yaml",
        [*SMALL[recipe], f"run.output_dir={tmp_path}", f"run.name={name}", "run.checkpoint_every=2",
         "run.keep_checkpoints=0", "run.progress=false", "sync.verify_every=0", *extra],
    )
    return module.main(cfg).path


def comparable(records):
    return [{k: v for k, v in r.items() if k not in WALL_TIME} for r in records]


def test_grpo_resume_after_a_checkpoint_write_killed_midway(tmp_path, monkeypatch, capsys):
    full = read_metrics(run("grpo", tmp_path, "full"))
    assert [r["step"] for r in full] == [1, 2, 3, 4]

    # Second run: the process dies while writing the final (step-4) checkpoint, state file half written.
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:
            real_save(obj, f, *args, **kwargs)
            f.truncate(f.tell() // 2)
            raise Killed
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(Killed):
        run("grpo", tmp_path, "killed")
    monkeypatch.undo()
    killed = tmp_path / "killed"
    assert [r["step"] for r in read_metrics(killed)] == [1, 2, 3, 4]  # step 4 was logged, not checkpointed
    assert any(p.name.startswith(".tmp-step_000004") for p in checkpoint.checkpoint_dir(killed).iterdir())
    assert checkpoint.find_latest(killed).name == "step_000002"

    capsys.readouterr()
    resumed = read_metrics(run("grpo", tmp_path, "killed", "resume=true"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # 3 and 4 recomputed from the step-2 checkpoint
    assert comparable(resumed) == comparable(full)
    assert not any(p.name.startswith(".tmp-") for p in checkpoint.checkpoint_dir(killed).iterdir())
    assert checkpoint.find_latest(killed, verify_hashes=True).name == "step_000004"  # the final step is saved
    ckpts = checkpoint.checkpoint_dir(killed)
    assert f"rlsync: resume: continuing {killed} from checkpoint {ckpts / 'step_000002'} (step 2)" in \
        capsys.readouterr().err

    # resumed again, the run is complete: it says so, builds no engine, and changes nothing
    def no_engine(*args, **kwargs):
        raise AssertionError("a complete run built an engine")

    monkeypatch.setattr(importlib.import_module(RECIPES["grpo"][0]), "VLLMEngine", no_engine)
    assert read_metrics(run("grpo", tmp_path, "killed", "resume=true")) == resumed
    err = capsys.readouterr().err
    assert f"rlsync: resume: {killed} is already complete: its checkpoint {ckpts / 'step_000004'} is at step 4" in err
    assert f"rlsync: run summary: {killed}" in err


def test_ppo_resume_restores_value_head_and_both_optimizers(tmp_path, monkeypatch):
    full = read_metrics(run("ppo", tmp_path, "full"))
    real_log = RunDir.log

    def log_then_die(self, step, metrics):
        real_log(self, step, metrics)
        if step == 3:
            raise Killed

    monkeypatch.setattr(RunDir, "log", log_then_die)
    with pytest.raises(Killed):
        run("ppo", tmp_path, "killed")
    monkeypatch.undo()
    resumed = read_metrics(run("ppo", tmp_path, "killed", "resume=true"))
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert comparable(resumed) == comparable(full)
    assert all("value_error" in r for r in resumed)


def test_grpo_resume_falls_back_from_a_tampered_final_checkpoint(tmp_path):
    path = run("grpo", tmp_path, "tampered")  # 4 steps, checkpoints at 2 and 4
    uninterrupted = comparable(read_metrics(path))
    final = checkpoint.checkpoint_dir(path) / "step_000004"
    weights = checkpoint.load_checkpoint(final)["modules"]["policy"]
    tensor = next(t for t in weights.values() if t.numel() >= 1024)
    data = bytearray((final / checkpoint.STATE_FILE).read_bytes())
    offset = bytes(data).find(tensor.numpy().tobytes())
    assert offset >= 0
    data[offset + 3] ^= 0x40  # one flipped bit in the final policy's weights: same size, a valid archive
    (final / checkpoint.STATE_FILE).write_bytes(bytes(data))

    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*step_000004: state.pt: sha256 does not match"):
        resumed = read_metrics(run("grpo", tmp_path, "tampered", "resume=true"))
    assert comparable(resumed) == uninterrupted  # steps 3 and 4 recomputed from the intact step-2 checkpoint
    assert checkpoint.find_latest(path, verify_hashes=True).name == "step_000004"  # rewritten intact
