"""More recipe runs under torchrun: the MoE config and the tensor-parallel config (split from
test_recipes_distributed.py so the suite's two xdist workers share the launcher runs; that module's docstring
describes what `run_recipe` / `check_run` check).

The MoE config (the built-in tiny Qwen3-MoE, each rank holding half of every fused expert tensor, FP8 experts in
each engine) learns and gathers exactly one decoder layer at a time. The FSDP2 + tensor-parallel config (one TP-2
FP8 engine spanning both ranks) learns, every rank's shard verified every step.
"""

import pytest
import torch

from tests.distributed import launch
from tests.distributed.test_recipes_distributed import check_run, run_recipe

pytestmark = pytest.mark.distributed


MOE_FSDP2 = "configs/grpo/tiny_cpu_moe_fsdp2.yaml"


def moe_layer_sync_bytes() -> int:
    """What an FSDP2 sync of the tiny Qwen3-MoE holds at its peak: one decoder layer gathered in fp32 and its bf16
    cast (the per-expert gate / up / down tensors are views of the cast fused experts, no copy). Read from the
    checkpoint, whose per-expert tensors hold the same elements as the in-memory layer."""
    from safetensors import safe_open

    from rlsync.default_model import family_spec, tiny_model_path

    with safe_open(tiny_model_path(family_spec("qwen3_moe")) / "model.safetensors", "pt") as f:
        numels = {name: f.get_slice(name).get_shape() for name in f.keys() if name.startswith("model.layers.0.")}
    return sum(torch.Size(shape).numel() for shape in numels.values()) * (4 + 2)


@pytest.fixture(scope="module")
def moe_fsdp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_fsdp2")
    log, wall = run_recipe("torchrun", MOE_FSDP2, ["grpo.steps=8"], out, timeout_s=300)
    return check_run(log, out, 8), wall


def test_grpo_moe_fsdp2_under_torchrun_learns_one_layer_at_a_time(moe_fsdp2_run):
    records, wall = moe_fsdp2_run
    assert wall < 300
    # measured here: mean reward 0.14 over steps 1-3, 0.51 over steps 6-8 (a random policy stays at ~0.08)
    first, last = (sum(r["reward"] for r in part) / 3 for part in (records[:3], records[-3:]))
    assert last > first + 0.3, f"reward {first:.3f} -> {last:.3f}"
    peak = moe_layer_sync_bytes()
    for r in records:
        assert r["sync/groups"] == 4, r  # embeddings, 2 decoder layers (attention, router, 8 experts), norm + head
        assert r["sync/peak_gathered_bytes"] == peak, r  # the ranks' mean: every rank, every step, one layer
        # every engine tensor written was verified, the experts' FP8 w13 / w2 and their scales among them
        assert r["sync/verified_tensors"] == r["sync/written_tensors"] == 29, r


TP2 = "configs/grpo/tiny_cpu_fsdp2_tp2.yaml"


def test_grpo_fsdp2_with_one_tensor_parallel_engine_learns(tmp_path):
    """FSDP2 over both ranks, and one TP-2 FP8 engine spanning them: each rank's shard verified every step."""
    with launch.tp_engines_alone():
        log, wall = run_recipe("torchrun", TP2, ["grpo.steps=8"], tmp_path, timeout_s=300)
    records = check_run(log, tmp_path, 8, engine_logs=1)  # one engine over both ranks
    assert wall < 300
    assert "tensor_parallel_size=2" in log
    # measured here: mean reward 0.11 over steps 1-3, 0.48 over steps 6-8 (a random policy stays at ~0.08)
    first, last = (sum(r["reward"] for r in part) / 3 for part in (records[:3], records[-3:]))
    assert last > first + 0.2, f"reward {first:.3f} -> {last:.3f}"
    for r in records:
        assert r["sync/verified_tensors"] == r["sync/written_tensors"] == 25, r  # each rank: its shard of every tensor
        assert r["logprob_mismatch"] < 0.05, r  # the sharded FP8 engine samples what the trainer scores
