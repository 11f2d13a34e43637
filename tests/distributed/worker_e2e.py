"""torchrun worker: FSDP2 trainer + one colocated FP8 vLLM engine per rank, synced after each step.

Per rank: initialise the trainer's process group first, then build the
engine (`quantization="rlsync_fp8"`, per-channel, default reload backend).
After each real AdamW step every rank calls `engine.sync(model, step)` (the
FSDP2 source gathers in lockstep); step 2 syncs with `verify=True` (kernel
tensors bit-exact against the reference quantization). Each engine's
log-probs must then match its trainer's with the tolerance derivation of
tests/integration/test_plugin_fp8.py: engine vs the trainer with FP8-
dequantized linear weights within 2 e_bf16 + 1e-3, where e_bf16 is the bf16
engine tolerance of tests/integration/test_engine_sync.py (0.02).

    torchrun --nproc_per_node 2 tests/distributed/worker_e2e.py TINY_PATH
"""

import os
import random
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402

from tests.distributed.common import decoder_layers, load_model, log, main_guard, train_step, write_result  # noqa: E402
from tests.integration.support import dequantized_trainer, hf_logprobs  # noqa: E402

BF16_LOGPROB_TOL = 0.02  # tests/integration/test_engine_sync.py
FP8_VS_DEQUANTIZED_TOL = 2 * BF16_LOGPROB_TOL + 1e-3
SEQS = [[random.Random(s).randrange(4, 64) for _ in range(24)] for s in range(3)]


def logprobs(model) -> list[torch.Tensor]:
    return hf_logprobs(model, SEQS)


def dequantized_copy(path: str, sharded) -> torch.nn.Module:
    """An unsharded copy of the trainer with every linear weight replaced by its FP8 (channel) dequantization."""
    model = load_model(path)
    model.load_state_dict(get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True)))
    return dequantized_trainer(model, "channel")


def main():
    path = sys.argv[1]
    dist.init_process_group("gloo")  # before the engine: building vLLM first fails on CPU
    from torch.distributed.fsdp import fully_shard

    from rlsync.engine import VLLMEngine
    from rlsync.quant.plugin import hf_overrides

    engine = VLLMEngine(path, quantization="rlsync_fp8", llm_kwargs={"hf_overrides": hf_overrides("channel")})
    model = load_model(path)
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    results = []
    for step in (1, 2):
        loss = train_step(model, optimizer, seed=step)
        report = engine.sync(model, step=step, verify=step == 2)
        lp_engine = engine.score(SEQS)
        lp_trainer = logprobs(model)  # FSDP2 forward: a collective, all ranks run it
        lp_deq = logprobs(dequantized_copy(path, model))
        vs_deq = max(float((a - b).abs().max()) for a, b in zip(lp_engine, lp_deq))
        vs_trainer = max(float((a - b).abs().max()) for a, b in zip(lp_engine, lp_trainer))
        quant_effect = max(float((a - b).abs().max()) for a, b in zip(lp_deq, lp_trainer))
        log(f"step {step}: loss {loss:.4f}, sync {report.seconds:.3f} s, {report.num_groups} groups, "
            f"peak gathered {report.peak_gathered_bytes} B, verified={report.verified}; max|d logp| "
            f"engine-vs-dequantized {vs_deq:.4f} (tol {FP8_VS_DEQUANTIZED_TOL:.4f}), engine-vs-trainer "
            f"{vs_trainer:.4f} (quantization alone {quant_effect:.4f})")
        assert engine.step == step
        assert vs_deq <= FP8_VS_DEQUANTIZED_TOL, f"step {step}: engine vs dequantized trainer {vs_deq:.4f}"
        assert vs_trainer <= quant_effect + FP8_VS_DEQUANTIZED_TOL, f"step {step}: engine vs trainer {vs_trainer:.4f}"
        assert step != 2 or (report.verified and report.num_verified > 0)
        results.append({"step": step, "loss": loss, "sync_s": report.seconds, "vs_deq": vs_deq,
                        "vs_trainer": vs_trainer, "quant_effect": quant_effect,
                        "peak_gathered": report.peak_gathered_bytes})
    write_result(results)


if __name__ == "__main__":
    main_guard(main)
