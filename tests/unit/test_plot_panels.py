"""`rlsync plot` draws each recipe's metrics file: the panels every recipe gets, the sync panel on a log scale
with verified syncs marked, trl's mismatch metric, PPO's value panel. The records carry the keys each recipe
writes (sync keys from a real `SyncReport`; the recipes' real runs are plotted in tests/integration)."""

import json

import pytest

from rlsync.cli import main
from rlsync.engine.report import SyncReport
from rlsync.rl.plot import VALUE_KEYS, figure
from rlsync.rl.summary import MISMATCH_KEYS

TRL_MISMATCH = "sampling/sampling_logp_difference/mean"
SYNC_TITLE = "sync seconds (log scale)"
STEPS = 6


def sync_metrics(step, verify_every=3):
    verified = step % verify_every == 0
    report = SyncReport(step=step, backend="rlsync", seconds=1.0 if step == 1 else 0.008, num_bytes=2_396_672,
                        num_groups=4, num_tensors=26, peak_load_bytes=524_288, planned=step > 1,
                        verified=True if verified else None, num_verified=25 if verified else 0,
                        num_written=25 if verified else 0)
    return report.metrics()


def grpo_record(step):
    return {"step": step, "time": 100.0 + step, "logprob_mismatch": 0.015 / step, "loss": 0.1, "grad_norm": 4.0,
            "clip_fraction": 0.0, "reward": 0.1 * step, "step_seconds": 0.3, **sync_metrics(step)}


def ppo_record(step):
    return {**grpo_record(step), "value_mean": 0.1 * step, "return_mean": 0.2, "value_error": 1.0 / step,
            "explained_variance": 1 - 1.0 / step, "policy_loss": -0.01, "value_loss": 0.002 * step}


def trl_record(step, *, rlsync_names=True):
    record = {"step": step, "time": 100.0 + step, "loss": 0.001, "grad_norm": 4.2, "learning_rate": 5e-4,
              "completions/mean_length": 8.0, "rewards/vowel_reward/mean": 0.1 * step, "reward": 0.1 * step,
              "reward_std": 0.09, TRL_MISMATCH: 0.017 / step, "sampling/importance_sampling_ratio/mean": 1.0,
              "entropy": 4.1, "clip_ratio/region_mean": 0.0, "step_time": 0.2, **sync_metrics(step), "epoch": 0.06}
    if rlsync_names:  # what rlsync.adapters.trl adds: the same values under rlsync's names
        record.update(logprob_mismatch=record[TRL_MISMATCH], step_seconds=record["step_time"])
    return record


def draw(records):
    import matplotlib.pyplot as plt

    fig = figure(records, title="run")
    panels = {ax.get_title(): ax for ax in fig.axes}
    plt.close(fig)
    return panels


def labels(ax):
    return [line.get_label() for line in ax.get_lines()]


@pytest.mark.parametrize("recipe, record, value_panel", [("grpo", grpo_record, False), ("ppo", ppo_record, True),
                                                         ("trl_grpo", trl_record, False)])
def test_each_recipe_gets_its_panels(recipe, record, value_panel):
    records = [record(step) for step in range(1, STEPS + 1)]
    if recipe == "trl_grpo":  # trl's end-of-training record: a step that logged no per-step metric
        records.append({"step": STEPS, "time": 200.0, "train_runtime": 4.7, "train_loss": -0.03})
    panels = draw(records)
    expected = ["reward", "KL / mismatch", SYNC_TITLE] + (["value head (PPO)"] if value_panel else [])
    assert list(panels) == expected
    assert labels(panels["reward"]) == ["reward"]
    assert labels(panels["KL / mismatch"]) == ["logprob_mismatch"]  # one line, also in a trl run
    if value_panel:
        assert labels(panels["value head (PPO)"]) == list(VALUE_KEYS)
        ev = panels["value head (PPO)"].get_lines()[2]
        assert list(ev.get_ydata()) == [r["explained_variance"] for r in records]

    sync = panels[SYNC_TITLE]
    assert sync.get_yscale() == "log" and labels(sync) == ["sync/seconds"]
    assert list(sync.get_lines()[0].get_ydata()) == [1.0] + [0.008] * (STEPS - 1)  # the compile spike is kept
    (rings,) = sync.collections
    assert rings.get_label() == "verified bit for bit (2)"
    assert rings.get_offsets().tolist() == [[3, 0.008], [6, 0.008]]


def test_a_trl_run_without_rlsync_names_shows_trls_mismatch():
    panels = draw([trl_record(step, rlsync_names=False) for step in range(1, STEPS + 1)])
    assert labels(panels["KL / mismatch"]) == [TRL_MISMATCH] and MISMATCH_KEYS[-1] == TRL_MISMATCH


def test_kl_success_and_failed_verification_are_drawn():
    records = [grpo_record(step) | {"kl": 0.01 * step, "success": 0.1 * step} for step in range(1, STEPS + 1)]
    records[2]["sync/verified"] = 0.0  # a check that found differing bits
    panels = draw(records)
    assert labels(panels["reward"]) == ["reward", "success"]
    assert labels(panels["KL / mismatch"]) == ["kl", "logprob_mismatch"]
    rings, crosses = panels[SYNC_TITLE].collections
    assert (rings.get_label(), crosses.get_label()) == ("verified bit for bit (1)", "verification failed (1)")
    assert crosses.get_offsets().tolist() == [[3, 0.008]]


def test_a_panel_the_run_did_not_log_says_so(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "time": 1.0, "reward": 0.5}) + "\n")
    panels = draw([{"step": 1, "time": 1.0, "reward": 0.5}])
    assert [t.get_text() for t in panels["KL / mismatch"].texts] == ["not logged by this run"]
    assert panels[SYNC_TITLE].get_yscale() == "linear"  # no sync logged, nothing to put on a log axis
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
