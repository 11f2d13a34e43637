"""What a run prints: the end-of-run summary (figures from metrics.jsonl), resume messages, where vLLM's log
records go during a run, and a sync progress bar that reaches its total. No engine: records and checkpoints
are written by hand, vLLM's logger is driven by name (vLLM is never imported here)."""

import json
import logging
import os
import re
import statistics

import pytest
import torch
from torch import nn

from rlsync.adapters.vllm_logs import native_output_to_log
from rlsync.rl import checkpoint
from rlsync.rl.console import run_console
from rlsync.rl.resume import Checkpointer, is_complete
from rlsync.rl.rollout import ProgressSource
from rlsync.rl.run import RunConfig, RunDir
from rlsync.rl.state import TrainState
from rlsync.rl.summary import LOG_FILE, RunSummary, format_summary
from rlsync.rl.tasks import TaskConfig, make_task
from rlsync.source import source_for


def write_records(run_path, records):
    with (run_path / "metrics.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def recipe_records(num_steps=6, verify_every=3):
    """What the GRPO recipe logs per step, with made-up values (a slow first sync, as a real one is)."""
    records = []
    for step in range(1, num_steps + 1):
        record = {"step": step, "time": 1000.0 + 2.0 * step, "reward": 0.1 * step, "loss": 0.5,
                  "logprob_mismatch": 0.01 * (1 + step % 4), "step_seconds": 1.5,
                  "sync/seconds": 1.0 if step == 1 else 0.01 * step, "sync/gbps": 1.0}
        if step % verify_every == 0:
            record.update({"sync/verified": 1.0, "sync/verified_tensors": 28.0, "sync/written_tensors": 28.0})
        records.append(record)
    return records


def summary_rows(summary):
    return dict(summary.rows())


def test_summary_states_what_the_run_logged(tmp_path):
    records = recipe_records()
    write_records(tmp_path, records)
    for step in (3, 6):
        checkpoint.save_checkpoint(tmp_path, step, {"step": step}, keep=0)
    rows = summary_rows(RunSummary.from_run(tmp_path, session_seconds=42.0))

    assert rows["steps"] == "6 (steps 1-6)"
    assert rows["reward"] == f"{records[0]['reward']:.3f} (step 1) -> {records[-1]['reward']:.3f} (step 6)"
    syncs = [r["sync/seconds"] for r in records]
    assert rows["sync"] == f"median {statistics.median(syncs):.4f} s, max {max(syncs):.4f} s (step 1), 6 syncs"
    assert rows["verified"] == "2/2 syncs verified, 56/56 tensors bit for bit (2 of 6 syncs checked)"
    mismatch = [r["logprob_mismatch"] for r in records]
    assert rows["mismatch"] == (f"logprob_mismatch {mismatch[0]:.4f} (step 1) -> {mismatch[-1]:.4f} (step 6), "
                                f"max {max(mismatch):.4f}")
    # step 1 started at its log time minus its step_seconds; step 6 ended at its log time
    wall = records[-1]["time"] - (records[0]["time"] - records[0]["step_seconds"])
    assert rows["wall time"] == (f"{wall:.1f} s from step 1's start to step 6's end (9.0 s in steps); "
                                 f"this command 42.0 s")
    assert rows["metrics"] == str(tmp_path / "metrics.jsonl")
    assert rows["plot"] == f"not drawn yet: rlsync plot {tmp_path}"
    assert rows["checkpoints"] == f"{tmp_path / 'checkpoints' / 'step_000006'} (and step_000003)"
    assert "success" not in rows  # the vowels task has no right answers
    assert rows["exported"] == f"not exported: rlsync export {tmp_path} {tmp_path / 'export'}"

    (tmp_path / "metrics.png").write_bytes(b"png")
    text = format_summary(RunSummary.from_run(tmp_path, exported=tmp_path / "hf"))
    assert text.splitlines()[0] == f"run summary: {tmp_path}"
    assert re.search(rf"^  plot +{re.escape(str(tmp_path / 'metrics.png'))}$", text, re.M)
    assert re.search(rf"^  exported +{re.escape(str(tmp_path / 'hf'))}$", text, re.M)


def test_summary_says_what_a_run_did_not_log(tmp_path):
    # a trl-style record set: reward and a success rate, no rlsync sync metrics, trl's name for the mismatch
    write_records(tmp_path, [{"step": s, "time": 10.0 * s, "reward": 0.2 * s, "success": 0.25 * s,
                              "sampling/sampling_logp_difference/mean": 0.002 * s} for s in (1, 2)])
    rows = summary_rows(RunSummary.from_run(tmp_path))
    assert rows["success"] == "0.250 (step 1) -> 0.500 (step 2)"
    assert rows["sync"] == "not logged"
    assert rows["verified"] == "none of 0 syncs was verified"
    assert rows["mismatch"] == "sampling/sampling_logp_difference/mean 0.0020 (step 1) -> 0.0040 (step 2), max 0.0040"
    assert rows["wall time"] == "10.0 s from step 1's start to step 2's end"
    assert rows["checkpoints"] == "none"


def make_run(tmp_path, *, resume=False, verbose=False):
    config = RunConfig(output_dir=str(tmp_path), name="r", verbose=verbose, checkpoint_every=1)
    return RunDir(config, {"run": {"name": "r"}}, resume=resume)


def toy_state(seed=0):
    torch.manual_seed(seed)
    policy = nn.Linear(2, 2)
    return TrainState(modules={"policy": policy}, optimizers={"policy": torch.optim.SGD(policy.parameters(), lr=0.1)},
                      task=make_task(TaskConfig(), seed=0))


class RecordingEngine:
    def __init__(self):
        self.synced_steps = []

    def sync(self, source, *, step):
        self.synced_steps.append(step)


def test_resume_names_the_checkpoint_and_step_it_continues_from(tmp_path, capsys):
    run = make_run(tmp_path)
    Checkpointer(run, run.config, toy_state()).maybe_save(2)
    run = make_run(tmp_path, resume=True)
    engine = RecordingEngine()
    with run_console(run, run.config):
        assert not is_complete(run, 5, key="grpo.steps")  # step 2 of 5: more to run
        assert Checkpointer(run, run.config, toy_state(seed=1)).resume(engine, source=None) == 2
    err = capsys.readouterr().err
    assert f"rlsync: resume: continuing {run.path} from checkpoint {run.path / 'checkpoints' / 'step_000002'} " \
           f"(step 2)" in err
    assert "already complete" not in err
    assert engine.synced_steps == [2]


def test_resume_of_a_complete_run_says_so(tmp_path, capsys):
    run = make_run(tmp_path)
    Checkpointer(run, run.config, toy_state()).maybe_save(4)
    run = make_run(tmp_path, resume=True)
    with run_console(run, run.config):
        assert is_complete(run, 4, key="grpo.steps")
        assert is_complete(run, 3, key="grpo.steps")  # the checkpoint is past a lowered step count
    err = capsys.readouterr().err
    assert (f"rlsync: resume: {run.path} is already complete: its checkpoint "
            f"{run.path / 'checkpoints' / 'step_000004'} is at step 4 and grpo.steps is 4; nothing to run "
            f"(raise grpo.steps to continue the run)") in err
    assert "run summary:" in err  # the complete run's summary follows


def test_a_damaged_final_checkpoint_is_not_taken_for_a_complete_run(tmp_path):
    run = make_run(tmp_path)
    checkpoint.save_checkpoint(run.path, 2, {"step": 2}, keep=0)
    final = checkpoint.save_checkpoint(run.path, 4, {"step": 4}, keep=0)
    state = final / checkpoint.STATE_FILE
    data = bytearray(state.read_bytes())
    data[-5] ^= 0x01  # same size, different bytes: only the hash tells
    state.write_bytes(bytes(data))
    assert checkpoint.find_intact(run.path).name == "step_000002"
    assert not is_complete(run, 4, key="grpo.steps")  # a resume falls back to step 2 and runs 3 and 4


def test_resume_without_a_checkpoint_warns_on_the_terminal(tmp_path, capsys):
    run = make_run(tmp_path, resume=True)
    with run_console(run, run.config):
        assert Checkpointer(run, run.config, toy_state()).resume(RecordingEngine(), source=None) == 0
    assert "rlsync: warning: resume=true but" in capsys.readouterr().err


EXPECTED = "CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding, skip it."


@pytest.mark.parametrize("verbose", [False, True])
def test_vllm_records_go_to_the_run_log_and_only_unexpected_warnings_to_the_terminal(tmp_path, capfd, verbose,
                                                                                    monkeypatch):
    # the default level: trl's colocated engine sets VLLM_LOGGING_LEVEL=ERROR in the process environment, so an
    # earlier trl test in the same pytest process would otherwise make the run log errors only
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    vllm = logging.getLogger("vllm.v1.worker.cpu_worker")
    before = logging.getLogger("vllm").handlers[:]
    run = make_run(tmp_path, verbose=verbose)
    with run_console(run, run.config):
        vllm.info("Successfully reset prefix cache")
        vllm.warning(EXPECTED)
        vllm.warning("something unexpected")
        logging.getLogger("rlsync.rl.recipe").info("step 1 done")
        with native_output_to_log():  # an engine build: C++ writes straight to file descriptor 2
            os.write(2, b"[W utils.cpp:68] Warning: NUMA binding\n")
    out, err = capfd.readouterr()
    assert ("Successfully reset prefix cache" in out) == verbose
    assert (EXPECTED in out) == verbose
    assert "something unexpected" in out
    assert ("NUMA binding" in err) == verbose
    assert "rlsync: step 1 done" in err and "rlsync: run summary:" in err
    log = (run.path / LOG_FILE).read_text()
    for line in ("Successfully reset prefix cache", EXPECTED, "something unexpected", "step 1 done", "run summary"):
        assert line in log
    assert ("NUMA binding" in log) != verbose
    assert logging.getLogger("vllm").handlers == before  # the run's handlers are gone with the run
    with native_output_to_log():  # outside a run: stderr stays stderr
        os.write(2, b"after the run\n")
    assert "after the run" in capfd.readouterr().err


def test_the_sync_bar_reaches_its_total(capsys):
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    model.lm_head = nn.Linear(2, 2)
    source = ProgressSource(source_for(model))
    num_groups = sum(1 for _ in source.groups())  # the first sync learns the count
    assert num_groups >= 3
    capsys.readouterr()
    for _ in source.groups():
        pass
    frames = capsys.readouterr().err
    assert f"{num_groups}/{num_groups}" in frames, frames  # each group drawn, the last one too
