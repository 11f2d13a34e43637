"""The trl callback honours trl's `vllm_tensor_parallel_size`: the engine it builds spans k ranks.

trl 1.16's colocate mode gathers each tensor-parallel group's prompts itself; rlsync's callback takes over the
engine build and the weight sync. Here: the settings the callback reads from trl carry the size, the engine
config it builds sets it (rlsync then asks vLLM for its `external_launcher`), and a one-process build is refused
before vLLM starts. A TP-2 engine itself runs in tests/distributed/test_tensor_parallel.py.
"""

import types

import pytest

from rlsync.errors import ConfigError


def generation(tp: int):
    """The attributes of trl's `VLLMGeneration` that `settings_from` reads."""
    model = types.SimpleNamespace(name_or_path="/models/tiny", is_loaded_in_4bit=False, is_loaded_in_8bit=False)
    accelerator = types.SimpleNamespace(process_index=3)
    return types.SimpleNamespace(model=model, accelerator=accelerator, gpu_memory_utilization=0.3,
                                 max_model_length=256, enable_sleep_mode=False, tensor_parallel_size=tp,
                                 max_num_seqs=8, model_impl="auto", trust_remote_code=False)


def test_trls_tensor_parallel_size_reaches_the_engine_config(tiny_path):
    from rlsync.adapters.trl import settings_from
    from rlsync.engine import VLLMEngine
    from rlsync.integrations.trl import RLSyncConfig

    settings = settings_from(generation(2))
    assert settings.tensor_parallel_size == 2 and settings.seed == 1  # trl's seed: the rank's TP-group index
    assert "distributed_executor_backend" not in settings.llm_kwargs  # rlsync's to set
    cfg = RLSyncConfig(quantization="rlsync_fp8").engine_config(settings)
    kwargs = cfg.vllm_kwargs()
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["distributed_executor_backend"] == "external_launcher"
    one = RLSyncConfig().engine_config(settings_from(generation(1))).vllm_kwargs()
    assert one["tensor_parallel_size"] == 1 and "distributed_executor_backend" not in one
    cfg.model = str(tiny_path)
    with pytest.raises(ConfigError, match="engine.tensor_parallel_size=2: a tensor-parallel engine spans 2 processes"):
        VLLMEngine(cfg)  # this test process has no launcher: refused before vLLM is built
