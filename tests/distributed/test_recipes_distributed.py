"""The recipes under the real launchers: 2 ranks, one trainer backend switch, one FP8 vLLM engine per rank.

Each test starts `rlsync run CONFIG` through `torchrun --no-python` or
`deepspeed --no_python --no_local_rank` (the commands the configs open with)
with a short run and `sync.verify_every=1`, so every sync on every rank proves
its engine's FP8 tensors bit-exact against the reference quantization (a
mismatch raises and the launcher exits non-zero). The tests then check exit
code, wall time, one engine per rank (vLLM's per-process log prefix), and a
metrics file written by rank 0 alone with the ranks' mean of each metric.
FSDP2 also checkpoints and resumes: the resumed run's metrics equal the
uninterrupted run's exactly. (ZeRO runs refuse checkpoints when the config
loads: tests/unit/test_trainer.py.) The MoE and tensor-parallel configs run
the same way in test_recipes_distributed_moe_tp.py.

A separate launch per launcher runs `worker_stepper.py`: every backend's step
(gradient averaging, global-norm clipping, the value head outside the wrapper)
against a one-process reference on the concatenated batch.
"""

import re
import time
from pathlib import Path

import pytest

from rlsync.rl.run import read_metrics
from tests.distributed import launch

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ["sync.verify_every=1", "run.progress=false", "run.checkpoint_every=0"]
ENGINE_PIDS = re.compile(r"vllm \(pid (\d+)\) INFO .*init engine")
"""An engine's start in vLLM's log as a verbose run prints it (`rlsync.rl.console.VLLM_TERMINAL_FORMAT`)."""


def run_recipe(launcher: str, config: str, overrides: list[str], out: Path, timeout_s: float) -> tuple[str, float]:
    rlsync = str(launch.BIN / "rlsync")
    port = str(launch.free_port())
    if launcher == "torchrun":
        cmd = [str(launch.BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", port, "--no-python", rlsync]
    else:
        cmd = [str(launch.BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port, "--no_python",
               "--no_local_rank", rlsync]
    # run.verbose: vLLM's log on the terminal (a run sends it to RUN_DIR/run.log otherwise), where `check_run`
    # counts each rank's engine
    args = ["run", str(ROOT / config), f"run.output_dir={out}", "run.name=run", "run.verbose=true", *SETTINGS,
            *overrides]
    start = time.monotonic()
    proc = launch._run([*cmd, *args], out, timeout_s)
    if launcher == "deepspeed":
        launch.assert_no_shm_left(int(port))
    return proc.stdout + proc.stderr, time.monotonic() - start


def check_run(log: str, out: Path, steps: int, *, engine_logs: int = 2) -> list[dict]:
    """`engine_logs`: rank processes that log an engine start (2: one engine per rank; 1: one TP-2 engine, whose
    start vLLM logs on its first rank only)."""
    assert len(set(ENGINE_PIDS.findall(log))) == engine_logs, f"expected {engine_logs} rank processes logging an engine"
    assert log.count("rlsync: run directory") == 2, "both ranks must finish the recipe"
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == steps, f"{len(lines)} metric lines for {steps} steps: only rank 0 may write"
    records = read_metrics(out / "run")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for r in records:
        # the ranks' mean of a 0/1 flag: 1.0 only if both ranks verified this step's sync
        assert r["sync/verified"] == 1.0, r
        assert r["sync/peak_gathered_bytes"] < 2 * r["sync/bytes"], r  # one decoder layer, not the model
        for key in ("loss", "grad_norm", "reward", "logprob_mismatch"):
            assert r[key] == r[key], (key, r)  # present, not NaN
    return records


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    log, wall = run_recipe("torchrun", "configs/grpo/tiny_cpu_fsdp2.yaml", ["grpo.steps=3"], out, timeout_s=300)
    return check_run(log, out, 3), wall


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    # the first deepspeed launch on a machine JIT-compiles DeepSpeed's CPU comm op (~1 min)
    log, wall = run_recipe("deepspeed", "configs/grpo/tiny_cpu_zero3.yaml", ["grpo.steps=2"], out, timeout_s=420)
    return check_run(log, out, 2), wall


def test_grpo_fsdp2_under_torchrun(fsdp2_run):
    records, wall = fsdp2_run
    assert wall < 300
    assert all(r["sync/groups"] == 4 for r in records)  # embeddings, 2 decoder layers, final norm


def test_grpo_zero3_under_deepspeed(zero3_run):
    records, wall = zero3_run
    assert wall < 420


def test_fsdp2_and_zero3_take_the_same_first_step(fsdp2_run, zero3_run):
    # same seeds, same per-rank prompts and samples from the same base weights: step 1's rollout and loss
    # are the same computation, and the global gradient norm (FSDP2's DTensor reduction vs DeepSpeed's
    # partitioned one) agrees to float rounding
    first_fsdp2, first_zero3 = fsdp2_run[0][0], zero3_run[0][0]
    assert first_fsdp2["reward"] == first_zero3["reward"]
    for key in ("loss", "grad_norm"):
        assert first_fsdp2[key] == pytest.approx(first_zero3[key], rel=1e-5), key


def test_fsdp2_checkpoint_and_resume_reproduce_the_uninterrupted_run(fsdp2_run, tmp_path):
    # 2 steps with a checkpoint each (full state dict through torch.distributed.checkpoint, written by rank 0),
    # then resume=true to step 3: every metric of every step equals the uninterrupted 3-step run's
    config = "configs/grpo/tiny_cpu_fsdp2.yaml"
    run_recipe("torchrun", config, ["grpo.steps=2", "run.checkpoint_every=1"], tmp_path, timeout_s=300)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == ["step_000001",
                                                                                        "step_000002"]
    log, _ = run_recipe("torchrun", config, ["grpo.steps=3", "run.checkpoint_every=1", "resume=true"], tmp_path,
                        timeout_s=300)
    resumed = check_run(log, tmp_path, 3)
    for want, got in zip(fsdp2_run[0], resumed, strict=True):
        for key in ("loss", "grad_norm", "reward", "logprob_mismatch", "clip_fraction"):
            assert got[key] == want[key], (want["step"], key, got[key], want[key])


def test_stepper_matches_one_process_reference_torch(tiny_path, tmp_path):
    ranks = launch.torchrun("worker_stepper.py", [str(tiny_path), "ddp,fsdp1,fsdp2"], tmp_path, timeout_s=300)
    for rank in ranks:
        assert [r["backend"] for r in rank] == ["ddp", "fsdp1", "fsdp2"]


def test_stepper_matches_one_process_reference_deepspeed(tiny_path, tmp_path):
    ranks = launch.deepspeed("worker_stepper.py", [str(tiny_path), "zero2,zero3"], tmp_path, timeout_s=420)
    for rank in ranks:
        assert [r["backend"] for r in rank] == ["zero2", "zero3"]
