"""Every trainer backend in 2 real processes (gloo): exact weights, bounded gathers, lockstep failure, FP8 e2e.

Six launches keep this CI-sized on 2 cores: one torchrun for DDP / Accelerate
/ FSDP1 / FSDP2 (+ byte budget, + drain, + LoRA), one deepspeed for ZeRO-2 /
ZeRO-3 (+ budget, + LoRA), one of each for MoE models (Qwen3-MoE and Mixtral,
experts fused in memory: every backend yields what `save_pretrained` writes),
two plain processes for the failing-rank case, and one torchrun with a vLLM
FP8 engine per rank. The worker scripts assert; these tests check they exited
0 and read the figures they wrote.
"""

import time

import pytest

from tests.distributed import launch

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def paths():
    from rlsync.default_model import TinyModelSpec, tiny_model_path

    return (
        str(tiny_model_path(TinyModelSpec(num_hidden_layers=4))),
        str(tiny_model_path(TinyModelSpec(num_hidden_layers=4, tie_word_embeddings=False))),
    )


@pytest.fixture(scope="module")
def moe_paths():
    from rlsync.default_model import family_spec, tiny_model_path

    return [str(tiny_model_path(family_spec("qwen3_moe"))), str(tiny_model_path(family_spec("mixtral")))]


def by_label(rank_results):
    return {r["label"]: r for r in rank_results}


def test_torch_backends_match_unsharded_model(paths, tmp_path):
    ranks = launch.torchrun("worker_torch.py", list(paths), tmp_path, timeout_s=420)
    for rank in ranks:
        res = by_label(rank)
        assert set(res) == {"ddp", "accelerate-ddp", "fsdp1", "fsdp2", "fsdp2-budget", "fsdp2-drain",
                            "fsdp2-lora", "ddp-lora"}
        assert res["fsdp2"]["peak"] == res["fsdp2"]["bound"] < res["fsdp2"]["model_bytes"]
        assert res["fsdp2-budget"]["peak"] <= 600_000 and res["fsdp2-budget"]["groups"] > res["fsdp2"]["groups"]
        assert res["fsdp2-lora"]["peak"] <= res["fsdp2-lora"]["bound"] < res["fsdp2-lora"]["model_bytes"]


def test_deepspeed_backends_match_unsharded_model(paths, tmp_path):
    # the first run on a machine JIT-compiles DeepSpeed's CPU comm op (~1 min)
    ranks = launch.deepspeed("worker_deepspeed.py", list(paths), tmp_path, timeout_s=540)
    for rank in ranks:
        res = by_label(rank)
        assert set(res) == {"zero2", "zero3", "zero3-budget", "zero3-lora"}
        assert res["zero3"]["peak"] == res["zero3"]["deepspeed_observed_peak"] == res["zero3"]["bound"]
        assert res["zero3-budget"]["deepspeed_observed_peak"] <= 600_000
        assert res["zero3-lora"]["peak"] < res["zero3-lora"]["model_bytes"]


def check_moe(rank_results, backends):
    # the workers assert names, shapes, dtypes and bits against save_pretrained's file, one decoder layer per
    # group, and peak == the largest layer group (gathered backends; the gate_up split makes views, no copy), 0 for
    # local ones; read the figures
    res = by_label(rank_results)
    assert set(res) == {f"{family}-{b}" for family in ("qwen3_moe", "mixtral") for b in backends}
    for r in res.values():
        assert r["groups"] == 4  # embeddings, 2 decoder layers (attention, router, 8 experts), norm + head
        assert r["peak"] == r["bound"] < r["model_bytes"]
    return res


def test_torch_backends_yield_moe_checkpoint_format(moe_paths, tmp_path):
    ranks = launch.torchrun("worker_moe_torch.py", moe_paths, tmp_path, timeout_s=300)
    for rank in ranks:
        res = check_moe(rank, ("ddp", "fsdp1", "fsdp2"))
        for family in ("qwen3_moe", "mixtral"):
            # DDP gathers nothing and copies nothing; FSDP1 (summon per layer unit) and FSDP2 (full_tensor per
            # parameter) hold the same one layer at their peak
            assert res[f"{family}-ddp"]["peak"] < res[f"{family}-fsdp1"]["peak"] == res[f"{family}-fsdp2"]["peak"]


def test_deepspeed_backends_yield_moe_checkpoint_format(moe_paths, tmp_path):
    ranks = launch.deepspeed("worker_moe_deepspeed.py", moe_paths, tmp_path, timeout_s=420)
    for rank in ranks:
        res = check_moe(rank, ("zero2", "zero3"))
        for family in ("qwen3_moe", "mixtral"):
            zero3 = res[f"{family}-zero3"]
            # rlsync holds nothing beyond what DeepSpeed gathered: splitting the fused experts makes views
            assert zero3["deepspeed_observed_peak"] == zero3["peak"]
            assert res[f"{family}-zero2"]["peak"] < zero3["peak"]


def test_a_rank_failing_inside_the_gather_fails_the_other_with_a_clear_error(paths, tmp_path):
    timeout_s = 5
    start = time.monotonic()
    procs = launch.plain_ranks("worker_failure.py", [paths[0], str(timeout_s)], tmp_path)
    codes = [p.wait(timeout=120) for p in procs]
    wall = time.monotonic() - start
    logs = [(tmp_path / f"log{r}").read_text()[-3000:] for r in range(2)]
    assert codes == [1, 1], f"exit codes {codes}\n{logs[0]}\n{logs[1]}"
    elapsed0, error0 = (tmp_path / "rank0.err").read_text().split("\n", 1)
    assert "LockstepError" in error0
    assert "rank 1 failed during gather of group model.layers.1" in error0
    assert "InjectedFailure: injected failure inside the gather" in error0
    assert float(elapsed0) <= timeout_s + 5, f"rank 0 needed {elapsed0} s with timeout_s={timeout_s}"
    assert "InjectedFailure" in (tmp_path / "rank1.err").read_text()
    assert wall < 120


def test_fp8_engine_per_rank_follows_its_fsdp2_trainer(tiny_path, tmp_path):
    ranks = launch.torchrun("worker_e2e.py", [str(tiny_path)], tmp_path, timeout_s=420)
    for rank in ranks:
        assert [r["step"] for r in rank] == [1, 2]
        assert all(r["vs_deq"] <= 0.041 for r in rank)
