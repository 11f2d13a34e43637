"""Tensor-parallel colocated engines: one vLLM engine spanning both ranks (`tensor_parallel_size=2`).

One torchrun launch of `worker_tp.py` builds, one after another, a TP-2 engine
per case: the built-in tiny Qwen2 in bf16, vLLM's `fp8_per_channel` and each
`rlsync_fp8` scheme, Phi-3 (checkpoint-fused qkv / gate_up, split per rank)
in FP8 channel, and Qwen3-MoE (every expert's part of the intermediate
size on each rank; vLLM's MoE runner all-reduces the partial outputs) in bf16,
FP8 block (block rows straddling the rank's gate / up parts) and FP8 channel (the
replay quantizes each stack of experts' rank parts in one call). For each it syncs twice with `verify=True` (each rank
proves its own shard bit for bit; the second sync replays the sync plan) and
compares log-probs with the reference the engine must match (the trainer for
bf16; its FP8 dequantization as the TP-2 engine stores it for FP8), within the
one-process tests' tolerances. The bf16 cases also check rlsync's rules for a
rank's slice (`rlsync.adapters.vllm_tp`, used by verify) against vLLM's own
weight loaders, which did the bf16 loading.

Fail closed across the group: on the last engine, rank 1 alone receives NaN
weights. Rank 0's own sync succeeds, yet both ranks end FAILED, both refuse to
generate, rank 0's error names rank 1, and a complete sync recovers both.
"""

from pathlib import Path

import pytest

from tests.distributed import launch

pytestmark = pytest.mark.distributed

CASES = ["qwen2:bf16", "qwen2:fp8_per_channel", "qwen2:tensor", "qwen2:block", "phi3:channel", "qwen3_moe:bf16",
         "qwen3_moe:block", "qwen3_moe:channel", "qwen2:channel"]


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    with launch.tp_engines_alone():
        return launch.torchrun("worker_tp.py", [",".join(CASES)], out, timeout_s=420)


def test_each_rank_holds_its_shard_and_every_sync_verifies(tp_results):
    for rank, results in enumerate(tp_results):
        cases = results[:-1]
        assert [c["case"] for c in cases] == CASES
        for c in cases:
            assert (c["tp_rank"], c["tp_size"]) == (rank, 2), c["case"]
            for s in c["syncs"]:
                assert s["verified"] and s["num_verified"] == s["num_written"] > 0, c["case"]
                if s["step"] == 2 or not c["case"].startswith("qwen3_moe"):  # see worker_tp.py on MoE routing
                    assert s["diff"] <= s["tol"], (c["case"], s)
            assert [s["planned"] for s in c["syncs"]] == [False, True], c["case"]


def test_ranks_agree_on_the_model(tp_results):
    """Both ranks of the group score with the one engine: identical log-probs."""
    for a, b in zip(tp_results[0][:-1], tp_results[1][:-1]):
        assert [s["diff"] for s in a["syncs"]] == [s["diff"] for s in b["syncs"]], a["case"]


def test_a_failure_on_one_rank_fails_the_whole_group(tp_results):
    rank0, rank1 = (r[-1]["fail_closed"] for r in tp_results)
    assert rank1["error"] and "non-finite" in rank1["error"]
    assert rank0["error"].startswith("sync to step 3 failed on another rank of this engine's tensor-parallel group")
    assert "rank 1 (TP rank 1): SyncError: non-finite" in rank0["error"]
    for r in (rank0, rank1):
        assert r["state"] == "failed" and r["refused"] and r["recovered"] == "ready"
        assert r["recovered_diff"] <= r["tol"]
