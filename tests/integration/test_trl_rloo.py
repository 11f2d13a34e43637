"""trl's RLOOTrainer with RLSyncCallback: the same takeover, FP8 engine verified after every sync."""

import math
import os

import pytest
import torch

_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "HF_HUB_OFFLINE")


@pytest.fixture(autouse=True)
def _offline_and_restore_env():
    saved = {k: os.environ.get(k) for k in _ENV}
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_rloo_fp8_synced_and_logged(tiny_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    from recipes.trl_grpo import vowel_reward
    from rlsync.integrations.trl import RLSyncCallback

    datasets = pytest.importorskip("datasets")
    callback = RLSyncCallback(quantization="fp8_per_channel", verify_every=1)
    trainer = RLOOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32),
        reward_funcs=vowel_reward,
        args=RLOOConfig(
            output_dir=str(tmp_path), use_vllm=True, vllm_mode="colocate", use_cpu=True, bf16=False,
            per_device_train_batch_size=8, num_generations=4, max_completion_length=8, max_steps=2,
            learning_rate=0.001, logging_steps=1, report_to=[], save_strategy="no", vllm_max_model_length=64,
        ),
        train_dataset=datasets.Dataset.from_dict({"prompt": ["bcdfgh:", "jklmnp:", "qrstvw:", "xzbcdf:"] * 4}),
        processing_class=AutoTokenizer.from_pretrained(tiny_path),
        callbacks=[callback],
    )
    assert trainer.vllm_generation.llm is callback.engine.llm  # trl samples from the rlsync engine
    trainer.train()
    assert [(r.step, r.verified, r.num_groups) for r in callback.reports] == [(0, True, 4), (1, True, 4)]
    records = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert math.isfinite(r["loss"]) and math.isfinite(r["reward"])
        assert r["sync/verified"] == 1.0 and r["sync/groups"] == 4.0 and r["sync/seconds"] > 0
