"""Kernel choice inside the `rlsync_fp8` engine: the `kernel` config key and RLSYNC_FP8_KERNEL.

Three channel-scheme engines on the tiny model, synced with the same trainer:
the default (emulated: dequantize + bf16 matmul), `kernel="torch_scaled_mm"`
from the config, and vLLM's FP8 kernel forced through the environment. Each
must verify bit for bit after the sync (the kernel never changes storage), and
the W8A8 kernels' log-probs must stay near the emulated engine's. Their only
extra error is one e4m3 rounding of each linear's input activations, with the
same relative-error statistics as the e4m3 rounding of the weights (same
format, amax scaling per token vs per channel). So the budget is the log-prob
effect of weight quantization measured in the same run (fp32 trainer vs fp32
trainer with reference-dequantized FP8 weights), plus 0.01 for bf16 compute.

All engines stay alive until the end: dropping an in-process vLLM engine tears
down vLLM's process-global parallel state under the others.
"""

import gc

import pytest
import torch

from rlsync.quant.kernels import KERNEL_ENV
from rlsync.quant.plugin import hf_overrides
from tests.integration.support import SEQS, dequantized_trainer, hf_logprobs, make_engine, perturb



@pytest.fixture(scope="module")
def engines(tiny_path):
    mp = pytest.MonkeyPatch()
    built = {}
    built["emulated"] = make_engine(tiny_path, quantization="rlsync_fp8", reload_backend="rlsync",
                                    llm_kwargs={"hf_overrides": hf_overrides("channel")})
    built["torch_scaled_mm"] = make_engine(tiny_path, quantization="rlsync_fp8", reload_backend="rlsync",
                                           llm_kwargs={"hf_overrides": hf_overrides("channel", kernel="torch_scaled_mm")})
    mp.setenv(KERNEL_ENV, "vllm")
    built["vllm"] = make_engine(tiny_path, quantization="rlsync_fp8", reload_backend="rlsync",
                                llm_kwargs={"hf_overrides": hf_overrides("channel")})
    mp.undo()
    yield built
    built.clear()
    gc.collect()


def kernel_names(engine):
    return {type(m.quant_method.kernel).__name__ for m in engine.model.modules()
            if type(getattr(m, "quant_method", None)).__name__ == "RLSyncFp8LinearMethod"}


def test_override_picks_the_named_kernel(engines):
    assert kernel_names(engines["emulated"]) == {"EmulatedKernel"}
    assert kernel_names(engines["torch_scaled_mm"]) == {"TorchScaledMMKernel"}
    assert kernel_names(engines["vllm"]) == {"VLLMKernel"}
    impls = {type(m.quant_method.kernel.impl).__name__ for m in engines["vllm"].model.modules()
             if type(getattr(m, "quant_method", None)).__name__ == "RLSyncFp8LinearMethod"}
    assert impls == {"ChannelWiseTorchFP8ScaledMMLinearKernel"}  # vLLM's own choice on this CPU


def test_w8a8_kernels_track_emulated_after_sync(engines, trainer_model):
    perturb(trainer_model, scale=0.05, seed=3)
    scores = {}
    for name, engine in engines.items():
        report = engine.sync(trainer_model, step=1, verify=True)
        assert report.verified
        scores[name] = engine.score(SEQS)
    lp_trainer = torch.cat(hf_logprobs(trainer_model))
    quant_effect = float((torch.cat(hf_logprobs(dequantized_trainer(trainer_model, "channel"))) - lp_trainer).abs().max())
    for name in ("torch_scaled_mm", "vllm"):
        diff = float((torch.cat(scores[name]) - torch.cat(scores["emulated"])).abs().max())
        print(f"{name} vs emulated: max|d logp| {diff:.4f} (budget {quant_effect + 0.01:.4f})")
        assert 0 < diff <= quant_effect + 0.01
