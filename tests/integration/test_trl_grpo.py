"""trl's GRPOTrainer with RLSyncCallback: FP8 engine, layer-group syncs, verified every step, LoRA merged per group.

Real trl 1.16 and vLLM's CPU build. Every sync runs with verify, which proves
bit for bit that the engine's kernel tensors are the reference FP8
quantization of the trainer's weights at that step. The recipe's run also
checks its terminal (rlsync's bar and summary, vLLM's log in run.log) and its
trackers (trl's reporters, under the names rlsync's recipes use).
"""

import copy
import math
import os
import re
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from safetensors.torch import load_file

from rlsync.cli import load_recipe_config
from rlsync.engine.verify import verify_groups
from rlsync.errors import ConfigError, EngineNotReady, SyncError
from rlsync.rl.export import checkpoint_tensors, compare_tensors, export_info, trl_checkpoints
from rlsync.rl.plot import figure
from rlsync.rl.run import read_metrics
from rlsync.rl.trainer_model import load_trainer_model
from rlsync.source import ModuleSource, group_key

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs/trl/grpo_tiny_cpu_fp8.yaml"
SMALL = [  # 2 prompts x 4 completions of 8 tokens per step: seconds per step on 2 cores
    "trl.per_device_train_batch_size=8", "trl.num_generations=4", "trl.max_completion_length=8",
    "trl.num_prompts=32", "trl.learning_rate=0.001", "rlsync.verify_every=1",
]
from tests.integration.trl_support import offline_and_restore_env, tiny_trainer  # noqa: F401 (autouse fixture)
from tests.unit.tracking_support import tensorboard_scalars, trackio_logs, wandb_history, wandb_offline_runs


def _num_layer_groups(names):
    keys = [group_key(n) for n in names]
    return sum(1 for i, k in enumerate(keys) if i == 0 or k != keys[i - 1])


def _count_loads(monkeypatch):
    from rlsync.reload import Reload

    calls = []
    original = Reload.load

    def load(self, group, **kwargs):
        calls.append([name for name, _ in group])
        return original(self, group, **kwargs)

    monkeypatch.setattr(Reload, "load", load)
    return calls


def _train_records(trainer):
    return [r for r in trainer.state.log_history if "loss" in r]


def test_unsupported_trl_version_fails_at_construction(monkeypatch):
    import trl

    from rlsync.integrations.trl import RLSyncCallback

    monkeypatch.setattr(trl, "__version__", "1.15.2")
    with pytest.raises(ConfigError, match=r"supports trl >=1\.16\.0,<1\.17\.0; found trl 1\.15\.2"):
        RLSyncCallback()


@pytest.mark.parametrize("bad", [{"use_vllm": False}, {"vllm_mode": "server"}])
def test_callback_refuses_what_it_cannot_take_over(tmp_path, bad):
    from trl import GRPOConfig

    from rlsync.integrations.trl import RLSyncCallback

    args = dict(output_dir=str(tmp_path), use_vllm=True, vllm_mode="colocate", use_cpu=True, bf16=False)
    with pytest.raises(ConfigError, match="RLSyncCallback"):
        RLSyncCallback().on_init_end(GRPOConfig(**{**args, **bad}), None, None, model=torch.nn.Linear(1, 1))


def test_config_options_are_checked():
    from rlsync.integrations.trl import RLSyncConfig

    with pytest.raises(ConfigError, match="fp8_scheme"):
        RLSyncConfig(quantization="fp8_per_channel", fp8_scheme="block")
    with pytest.raises(ConfigError, match="verify_every"):
        RLSyncConfig(verify_every=-1)
    _, cfg = load_recipe_config(CONFIG)
    assert cfg.recipe == "trl_grpo" and cfg.rlsync.quantization == "fp8_per_channel"
    with pytest.raises(ConfigError, match="num_generations"):
        load_recipe_config(CONFIG, ["trl.per_device_train_batch_size=12", "trl.num_generations=8"])


def test_grpo_recipe_fp8_verified_every_step(tmp_path, monkeypatch, capfd):
    loads = _count_loads(monkeypatch)
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)  # as in a user's shell, not left by earlier trl imports
    monkeypatch.delenv("VLLM_DIST_IDENT", raising=False)  # left in this test process by an earlier CPU engine
    project = f"rlsync-test-{tmp_path.name}"
    module, cfg = load_recipe_config(
        CONFIG, SMALL + ["trl.max_steps=3", f"run.output_dir={tmp_path}", "run.name=t", "run.checkpoint_every=2",
                         "run.export=true", "run.report_to=[tensorboard, wandb, trackio]", f"run.project={project}",
                         # max_num_seqs (8) x max_model_len >= trl's max_num_batched_tokens (4096), as in the
                         # shipped config; below it vLLM warns
                         "trl.vllm_max_model_length=512"]
    )
    initial = dict(load_trainer_model(cfg.model)[0].named_parameters())
    capfd.readouterr()
    run = module.main(cfg)
    terminal = capfd.readouterr()
    trainer, callback = run.trainer, run.callback
    engine = callback.engine

    # the terminal is rlsync's: its step bar and summary; vLLM's log (at INFO, not the ERROR trl's import sets) is
    # in run.log; no WARNING line, no printed log dict
    text = terminal.out + terminal.err
    # ... except wandb's own, when transformers' reporter asks the offline run for its URL
    text = text.replace("wandb: WARNING URL not available in offline run", "")
    # ... and vLLM's notice that an earlier engine in this test process registered its kernels already
    text = "\n".join(line for line in text.splitlines() if "is already registered. Overwriting." not in line)
    assert not [line for line in text.splitlines() if "WARNING" in line], text[-3000:]
    assert "{'loss'" not in text and "trl_grpo: 100%" in terminal.err
    summary = terminal.err[terminal.err.index("rlsync: run summary: "):]
    assert re.search(r"^  steps +3 \(steps 1-3\)$", summary, re.M), summary
    assert re.search(r"^  verified +3/3 syncs verified", summary, re.M), summary
    assert re.search(r"^  checkpoints +\S+/trl/checkpoint-3 \(and checkpoint-2\)$", summary, re.M), summary
    assert re.search(r"^  mismatch +logprob_mismatch ", summary, re.M), summary
    assert re.search(rf"^  exported +{re.escape(str(run.path / 'export'))} \(step 3\)$", summary, re.M), summary
    log = (run.path / "run.log").read_text()
    assert " INFO vllm." in log  # (trl's import warnings reach pytest's warning capture here, not stderr)
    assert "VLLM_LOGGING_LEVEL" not in os.environ

    # the trackers got trl's log through trl's reporters, under train/<name>, rlsync's names included
    per_step = [m for m in read_metrics(run.path) if "reward" in m]
    shared = ("reward", "loss", "grad_norm", "logprob_mismatch", "step_seconds", "sync/seconds", "sync/verified")
    for m in per_step:
        assert m["logprob_mismatch"] == m["sampling/sampling_logp_difference/mean"]
        assert m["step_seconds"] == m["step_time"]
    (wandb_file,) = wandb_offline_runs(run.path)
    for rows in (wandb_history(wandb_file), trackio_logs(project, "t")):
        rows = [row for row in rows if "train/reward" in row]
        assert [row["train/global_step"] for row in rows] == [1, 2, 3]
        for row, m in zip(rows, per_step):
            assert {k: row[f"train/{k}"] for k in shared} == {k: m[k] for k in shared}
    scalars = tensorboard_scalars(run.path / "tensorboard")
    assert [step for step, _ in scalars["train/logprob_mismatch"]] == [1, 2, 3]
    # and its plot draws the mismatch and rings the three verified syncs
    fig = figure(read_metrics(run.path), title="t")
    assert [line.get_label() for line in fig.axes[1].get_lines()] == ["logprob_mismatch"]
    assert fig.axes[2].collections[0].get_offsets()[:, 0].tolist() == [1, 2, 3]
    plt.close(fig)

    # trl syncs before each step's rollout: steps 0, 1, 2, each verified bit for bit
    assert [(r.step, r.verified) for r in callback.reports] == [(0, True), (1, True), (2, True)]
    records = _train_records(trainer)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        for key in ("loss", "reward", "sync/seconds", "sync/gbps", "sync/bytes", "sync/groups",
                    "sampling/sampling_logp_difference/mean", "sampling/importance_sampling_ratio/mean"):
            assert key in r and math.isfinite(r[key]), (key, r)
        assert r["sync/verified"] == 1.0
        # FP8 rollouts really differ from the fp32 trainer: that is what trl's IS correction reweights
        assert r["sampling/sampling_logp_difference/mean"] > 0
    assert [m["step"] for m in read_metrics(run.path) if "sync/seconds" in m] == [1, 2, 3]

    # trl saved transformers checkpoints (step 2, and the last step), and run.export made the last one a Hugging
    # Face checkpoint in the base's format: bf16, the base's names, the trained weights
    assert [p.name for p in trl_checkpoints(run.path)] == ["checkpoint-2", "checkpoint-3"]
    exported = run.path / "export"
    assert export_info(exported)["checkpoint"] == str(run.path / "trl" / "checkpoint-3")
    assert compare_tensors(checkpoint_tensors(exported), checkpoint_tensors(engine.config.model)) == []
    weight = "model.layers.1.mlp.down_proj.weight"
    trained = dict(trainer.model.named_parameters())[weight].detach().to(torch.bfloat16)
    assert torch.equal(load_file(exported / "model.safetensors")[weight], trained)
    with pytest.raises(ConfigError, match="already holds trl checkpoints"):  # a fresh run would mix them
        module.main(cfg)

    # one backend load per layer group, not per parameter
    names = list(engine.checkpoint_shapes)
    num_groups = _num_layer_groups(names)
    assert num_groups == 4 and len(names) == 26  # embed, layer 0, layer 1, final norm (head tied)
    assert len(loads) == 3 * num_groups
    assert all(r.num_groups == num_groups and r.num_tensors == len(names) for r in callback.reports)

    # the last optimizer step is synced at the next rollout; sync it now through trl's own entry point
    policy = trainer.model
    assert any(not torch.equal(initial[n], p) for n, p in policy.named_parameters()), "training changed nothing"
    trainer.vllm_generation.sync_weights()
    assert (callback.reports[-1].step, callback.reports[-1].verified) == (3, True)
    assert engine.step == trainer.state.global_step == 3

    # rollouts are refused from stale weights (trainer ahead of the engine) ...
    prompts = [[5, 6, 7]]
    trainer.state.global_step = 4
    with pytest.raises(EngineNotReady, match="step 3 weights but the trainer is at step 4"):
        trainer.vllm_generation.generate(prompts=prompts, images=None, num_generations=1)
    trainer.state.global_step = 3
    assert len(trainer.vllm_generation.generate(prompts=prompts, images=None, num_generations=1)[1]) == 1
    # ... and from a failed sync (the engine stays FAILED until a full sync)
    with pytest.raises(SyncError):
        engine.sync(torch.nn.Linear(2, 2), step=3)
    with pytest.raises(EngineNotReady, match="failed"):
        trainer.vllm_generation.generate(prompts=prompts, images=None, num_generations=1)


def test_grpo_lora_merged_per_group_base_untouched(tiny_path, tmp_path):
    from peft import LoraConfig

    from rlsync.integrations.trl import RLSyncCallback

    callback = RLSyncCallback(quantization="fp8_per_channel", verify_every=1)
    trainer = tiny_trainer("grpo", tiny_path, tmp_path, callback, learning_rate=0.01,
                           peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    trainer.train()
    peft_model, engine = trainer.model, callback.engine
    assert [(r.step, r.verified) for r in callback.reports] == [(0, True), (1, True)]
    for r in _train_records(trainer):
        assert math.isfinite(r["loss"]) and math.isfinite(r["reward"]) and r["sync/verified"] == 1.0
    assert any(bool(p.abs().sum() > 0) for n, p in peft_model.named_parameters() if "lora_B" in n)

    base_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" not in n}
    trainer.vllm_generation.sync_weights()  # the last step's adapters, merged one layer group at a time
    assert callback.reports[-1].verified and callback.reports[-1].num_groups == 4
    for n, p in peft_model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), f"sync changed the trainer's base weight {n}"

    # independently of rlsync's merge: the engine holds FP8(PEFT's merge_and_unload()), not FP8(base)
    written = set(engine.checkpoint_shapes)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    compared, num_written = verify_groups(engine.model, engine.packed, ModuleSource(merged, dtype=torch.bfloat16).groups(), written)
    assert compared == num_written > 0
    unmerged = copy.deepcopy(peft_model).unload()
    with pytest.raises(SyncError, match="bits differ"):
        verify_groups(engine.model, engine.packed, ModuleSource(unmerged, dtype=torch.bfloat16).groups(), written)
