"""Sleep mode under RLSyncCallback: wake weights, sync, wake KV cache, sample, sleep; weights verified each wake-up.

vLLM's CPU build refuses `enable_sleep_mode` at config time ("Sleep mode is
not supported on current platform.") and its CPU worker's `sleep`/`wake_up`
are no-ops. So this test (a) lets the CPU platform accept the flag, which
makes vLLM's engine core really pause and resume its scheduler and track
which memory is asleep, and (b) does to the weights what a GPU level-2 sleep
does, discarding them, by poisoning every engine parameter with NaN on each
`sleep(level=2)`. The weight sync and the order of calls are the real ones;
the memory release itself needs a GPU build of vLLM and is not exercised here.
"""

import math

import pytest
import torch

from rlsync.engine import VLLMEngine

from tests.integration.trl_support import offline_and_restore_env, tiny_trainer  # noqa: F401 (autouse fixture)


@pytest.fixture
def cpu_sleep_events(monkeypatch):
    """Record sleep / wake / sync / generate in order; a level-2 sleep discards (NaN-poisons) the weights."""
    import vllm
    from vllm.platforms import current_platform

    from rlsync.adapters import vllm_engine

    monkeypatch.setattr(type(current_platform), "is_sleep_mode_available", lambda self: True)
    events = []
    sleep, wake_up, generate, sync = vllm.LLM.sleep, vllm.LLM.wake_up, vllm.LLM.generate, VLLMEngine.sync

    def llm_sleep(self, level=1, **kwargs):
        sleep(self, level=level, **kwargs)
        if level == 2:
            with torch.no_grad():
                for p in vllm_engine.driver_model(self).parameters():
                    if p.is_floating_point() and p.numel():
                        p.fill_(float("nan"))
        events.append(f"sleep{level}")

    def llm_wake_up(self, tags=None):
        events.append(f"wake:{','.join(tags or ['all'])}")
        return wake_up(self, tags)

    def llm_generate(self, *args, **kwargs):
        events.append("generate")
        return generate(self, *args, **kwargs)

    def engine_sync(self, source, step, **kwargs):
        report = sync(self, source, step, **kwargs)
        events.append(f"sync{step}:{'verified' if report.verified else 'unverified'}")
        return report

    monkeypatch.setattr(vllm.LLM, "sleep", llm_sleep)
    monkeypatch.setattr(vllm.LLM, "wake_up", llm_wake_up)
    monkeypatch.setattr(vllm.LLM, "generate", llm_generate)
    monkeypatch.setattr(VLLMEngine, "sync", engine_sync)
    return events


def test_sleep_mode_order_and_weights_after_each_wake(tiny_path, tmp_path, cpu_sleep_events):
    from rlsync.integrations.trl import RLSyncCallback

    callback = RLSyncCallback(quantization="rlsync_fp8", fp8_scheme="block", reload_backend="rlsync", verify_every=1)
    trainer = tiny_trainer("grpo", tiny_path, tmp_path, callback, max_steps=3, vllm_enable_sleep_mode=True)
    assert cpu_sleep_events == ["sleep2"]  # built, then asleep while the trainer starts
    trainer.train()

    per_step = lambda s: ["wake:weights", f"sync{s}:verified", "wake:kv_cache", "generate", "sleep2"]  # noqa: E731
    assert cpu_sleep_events == ["sleep2", *per_step(0), *per_step(1), *per_step(2)]
    records = [r for r in trainer.state.log_history if "loss" in r]
    assert len(records) == 3
    for r in records:
        assert math.isfinite(r["loss"]) and math.isfinite(r["reward"]) and r["sync/verified"] == 1.0

    # asleep with discarded weights: a rollout re-pushes the trainer's weights before sampling
    del cpu_sleep_events[:]
    out = trainer.vllm_generation.generate(prompts=[[5, 6, 7]], images=None, num_generations=1)
    assert cpu_sleep_events == per_step(3)
    assert len(out[1][0]) == 8 and all(math.isfinite(lp[0]) for lp in out[2][0])
