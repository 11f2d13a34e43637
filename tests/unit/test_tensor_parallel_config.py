"""Tensor-parallel engines are refused before any build when the launch or the model cannot carry them.

`rlsync.engine.parallel.launch_problem` is the rule; `check_launch` feeds it this process's
torch.distributed state and the checkpoint's config.json. The TP engines themselves run in
tests/distributed/test_tensor_parallel.py.
"""

import json

import pytest

from rlsync.engine import EngineConfig
from rlsync.engine.parallel import check_launch, launch_problem, model_parallel_sizes
from rlsync.errors import ConfigError

SIZES = {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 512}


def test_a_fitting_launch_has_no_problem():
    assert launch_problem(2, 2, SIZES) is None
    assert launch_problem(2, 4, SIZES) is None  # two data-parallel groups of two
    assert launch_problem(4, 4, SIZES) is None  # KV heads replicated (vLLM: 4 ranks, 2 KV heads)
    assert launch_problem(1, None, SIZES) is None


@pytest.mark.parametrize("k, world, sizes, message", [
    (2, None, SIZES, "a tensor-parallel engine spans 2 processes, and this process has no torch.distributed. Start"),
    (2, 1, SIZES, "a tensor-parallel engine spans 2 processes, and this process has a world of 1 rank(s). Start"),
    (2, 3, SIZES, "the world of 3 ranks does not split into groups of 2"),
    (8, 8, SIZES, "the model's attention heads (num_attention_heads=4) do not divide by 8"),
    (2, 2, {**SIZES, "intermediate_size": 511}, "the model's MLP intermediate size (intermediate_size=511)"),
    (2, 2, {**SIZES, "moe_intermediate_size": 5}, "expert intermediate size (moe_intermediate_size=5)"),
    (4, 4, {"num_attention_heads": 12, "num_key_value_heads": 6}, "the model's 6 key/value heads neither divide by 4"),
])
def test_each_bad_launch_is_named(k, world, sizes, message):
    assert message in launch_problem(k, world, sizes)


def test_a_single_process_run_with_tp_is_refused_naming_the_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SIZES))
    with pytest.raises(ConfigError, match=r"engine.tensor_parallel_size=2: a tensor-parallel engine spans 2 processes, and this process has "
                       r"(no torch.distributed|a world of 1 rank)"):
        check_launch(2, tmp_path)
    check_launch(1, tmp_path)  # nothing to check


def test_model_sizes_come_from_config_json_including_a_nested_text_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": SIZES, "architectures": ["X"]}))
    assert model_parallel_sizes(tmp_path) == SIZES


def test_engine_config_sets_vllms_external_launcher_only_for_tp():
    two = EngineConfig(model="m", tensor_parallel_size=2).vllm_kwargs()
    assert two["tensor_parallel_size"] == 2 and two["distributed_executor_backend"] == "external_launcher"
    one = EngineConfig(model="m").vllm_kwargs()
    assert one["tensor_parallel_size"] == 1 and "distributed_executor_backend" not in one
    with pytest.raises(ConfigError, match="engine.tensor_parallel_size must be an int >= 1, got True"):
        EngineConfig(model="m", tensor_parallel_size=True).check()
