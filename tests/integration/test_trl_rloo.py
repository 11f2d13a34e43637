"""trl's RLOOTrainer with RLSyncCallback: the same takeover, FP8 engine verified after every sync."""

import math

from tests.integration.trl_support import offline_and_restore_env, tiny_trainer  # noqa: F401 (autouse fixture)


def test_rloo_fp8_synced_and_logged(tiny_path, tmp_path):
    from rlsync.integrations.trl import RLSyncCallback

    callback = RLSyncCallback(quantization="fp8_per_channel", verify_every=1)
    trainer = tiny_trainer("rloo", tiny_path, tmp_path, callback)
    assert trainer.vllm_generation.llm is callback.engine.llm  # trl samples from the rlsync engine
    trainer.train()
    assert [(r.step, r.verified, r.num_groups) for r in callback.reports] == [(0, True, 4), (1, True, 4)]
    records = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert math.isfinite(r["loss"]) and math.isfinite(r["reward"])
        assert r["sync/verified"] == 1.0 and r["sync/groups"] == 4.0 and r["sync/seconds"] > 0
