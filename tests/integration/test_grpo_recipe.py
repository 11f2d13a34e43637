"""The shipped GRPO configs (dense Qwen2, and Qwen3-MoE with FP8 experts) learn their task with FP8 rollouts, on
CPU, in seconds; the default config run through the `rlsync` command prints no warning and ends with a summary
of what it logged; a diverging run stops."""

import os
import re
import statistics
import subprocess
import sys
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


def overrides(tmp_path, *, steps: int, verify_every: int) -> list[str]:
    return [f"grpo.steps={steps}", f"run.output_dir={tmp_path}", "run.name=t", f"sync.verify_every={verify_every}"]


def run_and_check(config: str, tmp_path, *, steps: int, window: int, verify_every: int) -> list[dict]:
    """Run `config` for `steps` steps in this process, then `check_run`."""
    module, cfg = load_recipe_config(ROOT / config, overrides(tmp_path, steps=steps, verify_every=verify_every))
    run = module.main(cfg)
    return check_run(run.path, steps=steps, window=window, verify_every=verify_every)


def check_run(run_path: Path, *, steps: int, window: int, verify_every: int) -> list[dict]:
    """The mean reward of the last `window` steps beats the first `window`'s by MARGIN, every metric is finite,
    and every verified sync proved every tensor it wrote."""
    records = read_metrics(run_path)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    first = sum(r["reward"] for r in records[:window]) / window
    last = sum(r["reward"] for r in records[-window:]) / window
    assert last > first + MARGIN, f"reward {first:.3f} -> {last:.3f}"
    for r in records:
        for key in ("loss", "sync/seconds", "sync/gbps", "logprob_mismatch", "reward"):
            assert key in r and r[key] == r[key], (key, r)  # present and not NaN
    verified = [r for r in records if "sync/verified" in r]
    assert [r["sync/verified"] for r in verified] == [1.0] * (steps // verify_every)
    assert all(r["sync/verified_tensors"] == r["sync/written_tensors"] > 0 for r in verified)
    assert (run_path / "config.yaml").exists()
    return records


def rlsync_command() -> list[str]:
    """The `rlsync` entry point installed next to this interpreter, as the README runs it."""
    script = Path(sys.executable).parent / "rlsync"
    return [str(script)] if script.exists() else [sys.executable, "-m", "rlsync.cli"]


@pytest.mark.slow
def test_grpo_reward_rises_on_a_quiet_terminal_that_ends_with_a_summary(tmp_path):
    # the README's command in a fresh process (only shorter, and verifying more often), its terminal captured
    steps, verify_every = 16, 4
    # The environment of a user's shell, not of this test process after earlier tests: vLLM's CPU worker sets
    # VLLM_DIST_IDENT in a process that built an engine (a child inheriting it gets "Unknown vLLM environment
    # variable detected"), and importing trl sets VLLM_LOGGING_LEVEL=ERROR.
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_DIST_IDENT", "VLLM_LOGGING_LEVEL")}
    done = subprocess.run(
        [*rlsync_command(), "run", "configs/grpo/tiny_cpu_fp8.yaml",
         *overrides(tmp_path, steps=steps, verify_every=verify_every)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )
    terminal = done.stdout + done.stderr
    assert done.returncode == 0, terminal[-4000:]
    run = tmp_path / "t"
    records = check_run(run, steps=steps, window=4, verify_every=verify_every)

    lines = [line.strip() for line in re.split(r"[\r\n]", terminal) if line.strip()]
    assert not [line for line in lines if "warning" in line.lower()], terminal[-4000:]
    log = (run / "run.log").read_text()
    assert "Successfully reset prefix cache" in log and "Successfully reset prefix cache" not in terminal
    assert not [line for line in lines if line.startswith(("INFO", "(MainProcess", "vllm"))], terminal[-4000:]

    # the summary: every figure as metrics.jsonl has it
    summary = terminal[terminal.index(f"rlsync: run summary: {run}"):]
    rows = dict(re.findall(r"^  (\S+(?: time)?) +(.+)$", summary, re.M))
    assert rows["steps"] == f"{steps} (steps 1-{steps})"
    assert rows["reward"] == f"{records[0]['reward']:.3f} (step 1) -> {records[-1]['reward']:.3f} (step {steps})"
    syncs = [r["sync/seconds"] for r in records]
    assert rows["sync"].startswith(f"median {statistics.median(syncs):.4f} s, max {max(syncs):.4f} s")
    assert rows["verified"].startswith(f"{steps // verify_every}/{steps // verify_every} syncs verified")
    assert rows["mismatch"].startswith(f"logprob_mismatch {records[0]['logprob_mismatch']:.4f} (step 1) -> ")
    assert rows["wall time"].endswith(" s") and "this command" in rows["wall time"]
    assert rows["metrics"] == str(run / "metrics.jsonl")
    assert rows["plot"] == f"not drawn yet: rlsync plot {run}"
    assert rows["checkpoints"].startswith(str(run / "checkpoints" / f"step_{steps:06d}"))
    assert rows["log"] == str(run / "run.log")


@pytest.mark.slow
def test_grpo_moe_reward_rises(tmp_path):
    # the built-in tiny Qwen3-MoE (model.builtin: qwen3_moe), experts in FP8 in the engine. Measured here with
    # seed 0: mean reward 0.13 over steps 1-3, 0.53 over steps 6-8 (0.96 at step 16, the config's length)
    records = run_and_check("configs/grpo/tiny_cpu_moe_fp8.yaml", tmp_path, steps=8, window=3, verify_every=4)
    # groups: embeddings, 2 decoder layers (attention, router, 8 experts each), final norm + head. Each verified
    # sync wrote 29 engine tensors, verify compared all of them: per layer qkv, o, their 2 scales, q/k norms, 2
    # layer norms, the router and the experts' FP8 w13, w2 and their 2 scales; embedding, final norm, head
    assert all(r["sync/groups"] == 4 for r in records)
    assert [r["sync/written_tensors"] for r in records if "sync/verified" in r] == [29.0, 29.0]


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
