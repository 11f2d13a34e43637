"""Shared setup of the trl integration tests: offline env and a tiny colocated trainer."""

import os

import pytest
import torch

_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "HF_HUB_OFFLINE")
PROMPTS = ["bcdfgh:", "jklmnp:", "qrstvw:", "xzbcdf:"] * 4


@pytest.fixture(autouse=True)
def offline_and_restore_env():
    """No hub access; undo the rank variables trl's colocate setup exports, for the tests after these."""
    saved = {k: os.environ.get(k) for k in _ENV}
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def tiny_trainer(kind, tiny_path, tmp_path, callback, *, max_steps=2, learning_rate=0.001, peft_config=None, **args):
    """A colocated trl `GRPOTrainer` (`kind="grpo"`) or `RLOOTrainer` (`"rloo"`) on the tiny model, 4 x 4 samples a step."""
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlsync.rl.tasks import vowel_share

    datasets = pytest.importorskip("datasets")
    trainer_cls, config_cls = {"grpo": (trl.GRPOTrainer, trl.GRPOConfig), "rloo": (trl.RLOOTrainer, trl.RLOOConfig)}[kind]
    extra = {"peft_config": peft_config} if peft_config is not None else {}
    return trainer_cls(
        model=AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32),
        reward_funcs=vowel_share,
        args=config_cls(
            output_dir=str(tmp_path), use_vllm=True, vllm_mode="colocate", use_cpu=True, bf16=False,
            per_device_train_batch_size=8, num_generations=4, max_completion_length=8, max_steps=max_steps,
            learning_rate=learning_rate, logging_steps=1, report_to=[], save_strategy="no", vllm_max_model_length=64,
            **args,
        ),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=AutoTokenizer.from_pretrained(tiny_path),
        callbacks=[callback],
        **extra,
    )
