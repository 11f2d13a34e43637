"""An exported run serves as it trained: a `VLLMEngine` built from `rlsync export`'s directory (bf16, LoRA merged)
scores sequences as the trainer's fp32 PEFT model does, within bf16 rounding. One engine build."""

import torch

from rlsync.rl.export import export_run
from rlsync.rl.trainer_model import ModelConfig, load_trainer_model
from tests.integration.support import SEQS, hf_logprobs, make_engine
from tests.unit.support import trained_run

# bf16 engine vs fp32 trainer on the tiny model: test_engine_sync.py measured max |d logp| ~0.005 after a sync.
# Measured here from the export (LoRA r=4 on every linear, adapters moved by seeded noise): 0.0084 and 0.0091 in
# two runs, over 92 tokens. 0.02 as there; the adapters move the log-probs by up to 1.2 (asserted > 0.1), so an
# export of the base weights, or of unmerged ones, fails.
BF16_LOGPROB_TOL = 0.02


def test_engine_from_the_export_matches_the_trainer(tmp_path):
    run, policy = trained_run(tmp_path, "trainer.lora.r=4", "trainer.lora.alpha=16", scale=0.05)
    out = export_run(run, tmp_path / "hf").path
    want = torch.stack(hf_logprobs(policy.eval()))  # the trainer's PEFT model, adapters unmerged, fp32
    base = torch.stack(hf_logprobs(load_trainer_model(ModelConfig())[0].eval()))
    moved = (want - base).abs().max().item()
    assert moved > 5 * BF16_LOGPROB_TOL, f"the adapters barely changed the model (max |d logp| = {moved:.4f})"

    engine = make_engine(str(out))  # vLLM loads the export like any Hugging Face checkpoint
    got = torch.stack(engine.score(SEQS))
    error = (got - want).abs().max().item()
    print(f"export round trip: max |engine - trainer| log-prob = {error:.4f} over {got.numel()} tokens "
          f"(the adapters moved them by up to {moved:.4f})")
    assert error < BF16_LOGPROB_TOL, f"engine on the export vs trainer: max |d logp| = {error:.4f}"
