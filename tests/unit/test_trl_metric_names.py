"""trl's metrics under rlsync's names: the wrapped `log` copies each named trl metric's window before trl averages
it (a real trl run checks the result in tests/integration/test_trl_grpo.py); the trl recipe names trl's mean of
the task's success reward `success`. No trl import: trl 1.16's `GRPOTrainer.log` is mirrored by `trl_log`."""

import math
from collections import defaultdict
from types import SimpleNamespace

from rlsync.adapters import trl as trl_adapter
from rlsync.default_model import build_tokenizer
from rlsync.recipes.trl_grpo import success_metric
from rlsync.rl.tasks import TaskConfig, make_task

TRL_MISMATCH = "sampling/sampling_logp_difference/mean"


def trl_log(trainer, logs, start_time=None):
    """What trl 1.16's `GRPOTrainer.log` does with its metric windows: average each, log, clear."""
    window = trainer._metrics["train"]
    logs.update({key: sum(values) / len(values) for key, values in window.items()})
    trainer.logged.append(dict(logs))
    window.clear()


class Host:
    def __init__(self, metric_names):
        self.metric_names = metric_names
        self.pending = [{"sync/seconds": 0.25}]

    def drain_metrics(self):
        pending, self.pending = self.pending, []
        return pending


def trainer_with(host):
    generation = SimpleNamespace()
    setattr(generation, trl_adapter._HOST, host)
    return SimpleNamespace(_metrics={"train": defaultdict(list)}, model=SimpleNamespace(training=True),
                           vllm_generation=generation, logged=[])


def test_named_trl_metrics_are_logged_again_under_rlsyncs_names():
    host = Host(dict(trl_adapter.RLSYNC_NAMES) | {"success": "rewards/math_reward/mean"})
    trainer = trainer_with(host)
    window = trainer._metrics["train"]
    window[TRL_MISMATCH] += [0.02, 0.04]  # two steps in one logging window (logging_steps=2)
    window["step_time"] += [1.5, 2.5]
    window["rewards/math_reward/mean"] += [0.25, 0.5]
    trl_adapter._wrap_log(trl_log)(trainer, {"loss": 0.1})
    (logged,) = trainer.logged
    assert logged["logprob_mismatch"] == logged[TRL_MISMATCH] and math.isclose(logged["logprob_mismatch"], 0.03)
    assert logged["step_seconds"] == logged["step_time"] == 2.0
    assert logged["success"] == logged["rewards/math_reward/mean"] == 0.375
    assert logged["sync/seconds"] == 0.25 and logged["loss"] == 0.1

    # a name whose trl metric was not logged in the window is left out, not logged as 0 or NaN
    window["step_time"].append(1.0)
    trl_adapter._wrap_log(trl_log)(trainer, {})
    assert "logprob_mismatch" not in trainer.logged[-1] and trainer.logged[-1]["step_seconds"] == 1.0


def test_the_trl_recipe_logs_success_for_a_task_with_right_answers():
    gsm8k = make_task(TaskConfig(name="gsm8k", prompt_length=256), seed=0, tokenizer=build_tokenizer())
    assert success_metric(gsm8k) == {"success": "rewards/math_reward/mean"}  # trl's name: the function's
    assert gsm8k.spec.success.__name__ == "math_reward"
    assert success_metric(make_task(TaskConfig(name="vowels"), seed=0)) == {}  # no right answers
