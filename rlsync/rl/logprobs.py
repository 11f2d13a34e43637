"""Per-token log-probs of completions under the trainer model, batched and padded."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(kw_only=True, slots=True)
class RolloutBatch:
    """Sampled sequences, right-padded, with per-completion-token data."""

    input_ids: torch.Tensor
    """[B, T] prompt + completion token ids (padding = 0)."""
    attention_mask: torch.Tensor
    """[B, T] 1 for real tokens."""
    completion_mask: torch.Tensor
    """[B, T-1] 1 where position t+1 is a completion token (aligned with log-probs of token t+1)."""
    rollout_logprobs: torch.Tensor
    """[B, T-1] engine log-probs of the sampled tokens (0 elsewhere)."""

    def to(self, device: torch.device | str) -> "RolloutBatch":
        return RolloutBatch(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def make_batch(prompts: list[list[int]], completions: list[list[int]], logprobs: list[list[float]]) -> RolloutBatch:
    """Pack (prompt, completion, engine log-probs) triples into padded tensors."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    num = len(seqs)
    input_ids = torch.zeros(num, width, dtype=torch.long)
    attention = torch.zeros(num, width, dtype=torch.long)
    comp_mask = torch.zeros(num, width - 1)
    roll_lp = torch.zeros(num, width - 1)
    for i, (p, c, lp) in enumerate(zip(prompts, completions, logprobs)):
        seq = p + c
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
        start = len(p) - 1  # log-prob of token t+1 sits at index t
        comp_mask[i, start : start + len(c)] = 1
        roll_lp[i, start : start + len(c)] = torch.tensor(lp, dtype=torch.float32)
    return RolloutBatch(input_ids=input_ids, attention_mask=attention, completion_mask=comp_mask, rollout_logprobs=roll_lp)


def token_logprobs(model: torch.nn.Module, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
    """[B, T-1] log p(token t+1 | tokens <= t) under `model` at `temperature` (fp32)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
