"""Rollouts from the colocated engine and the sync back into it, shared by the recipes.

Why here: GRPO and PPO sample, score and sync the same way; only their losses
differ. Two choices make runs reproducible and resumable:
- every `generate` call is seeded with `step_seed(run seed, step)` (vLLM gives
  the i-th completion of a prompt seed + i), so step s samples the same tokens
  whether or not the run was restarted before it, given the same weights;
- the sync goes through a `WeightSource` built here (cast to the engine dtype
  group by group, as the engine would) wrapped in `ProgressSource`, which draws
  a progress bar over layer groups without touching the source's bounds.

Tensor-parallel engines: the k trainer ranks of one engine each draw their own
prompts (their own task seed) and train on their own samples, so no sample is
duplicated across ranks; the engine generates the k ranks' prompts in one call,
each rank's with that rank's seed, so a rank's samples are what a one-rank
engine with the same weights would draw.

Limitations:
1. One seed per rank and call: prompt j's i-th completion and prompt k's i-th completion
   draw from the same per-request random stream (vLLM takes one SamplingParams
   per `VLLMEngine.generate` call). Groups stay independent within themselves,
   which is what group advantages need; see the recipes' docstrings.
2. Rewards are sequence-level (the task's `rewards(prompts, completions)`), as the tasks are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from tqdm import tqdm

from rlsync.engine import EngineConfig
from rlsync.errors import ConfigError
from rlsync.rl.logprobs import RolloutBatch, make_batch
from rlsync.rl.state import step_seed
from rlsync.source import WeightSource, source_for
from rlsync.source.base import Group, SourceConfig, TensorMeta
from rlsync.trainer import TrainerConfig


@dataclasses.dataclass(kw_only=True, slots=True)
class SyncConfig:
    """How often a sync also proves its result."""

    verify_every: int = 0
    """Verify every N-th sync bit for bit against the reference (0 = never)."""

    def validate(self) -> None:
        if self.verify_every < 0:
            raise ConfigError(f"sync.verify_every must be >= 0, got {self.verify_every}")


@dataclasses.dataclass(kw_only=True, slots=True)
class Rollout:
    """One step's samples: `num_prompts * n` sequences, prompt by prompt."""

    batch: RolloutBatch
    rewards: torch.Tensor
    """[B] sequence-level rewards."""
    texts: list[str]
    """Completion texts, in batch order."""


def collect(engine, task, tokenizer, *, num_prompts: int, n: int, max_tokens: int, temperature: float,
            seed: int, step: int, device: torch.device | str = "cpu") -> Rollout:
    """Sample `n` completions for each of `num_prompts` task prompts; tensors on the trainer's `device`."""
    drawn = task.prompts(num_prompts)
    prompts = [tokenizer(p)["input_ids"] for p in drawn]
    # A tensor-parallel engine spans several trainer ranks, and each must submit the same requests: every rank
    # sends the group's prompts together, each with its own rank's seed, and keeps the completions of its own.
    group = engine.gather_in_group((prompts, step_seed(seed, step)))
    mine = sum(len(p) for p, _ in group[:engine.tp_rank])
    results = engine.generate([q for p, _ in group for q in p], n=n, max_tokens=max_tokens, temperature=temperature,
                              seed=[s for p, s in group for _ in p])[mine:mine + len(prompts)]
    samples = [(r.prompt_token_ids, c) for r in results for c in r.completions]
    batch = make_batch([p for p, _ in samples], [c.token_ids for _, c in samples], [c.logprobs for _, c in samples])
    texts = [c.text for _, c in samples]
    answered = [p for p, r in zip(drawn, results, strict=True) for _ in r.completions]  # each completion's prompt
    rewards = torch.tensor(task.rewards(answered, texts), dtype=torch.float32, device=device)
    return Rollout(batch=batch.to(device), rewards=rewards, texts=texts)


class ProgressSource(WeightSource):
    """A `WeightSource` that shows a progress bar over another source's groups."""

    def __init__(self, inner: WeightSource, *, desc: str = "sync", enabled: bool = True) -> None:
        super().__init__(dtype=inner.dtype)
        self.inner = inner
        self.stats = inner.stats  # the engine reports the inner source's gather bounds
        self.desc = desc
        self.enabled = enabled
        self._num_groups: int | None = None

    def metadata(self) -> list[TensorMeta]:
        return self.inner.metadata()

    def groups(self) -> Iterator[Group]:
        # mininterval=0: a sync of a small model takes milliseconds, well under tqdm's default 0.1 s between
        # redraws, so the bar would show 0/N until it is cleared; each group is drawn instead (a few per sync)
        bar = tqdm(desc=self.desc, unit="group", total=self._num_groups, leave=False, disable=not self.enabled,
                   mininterval=0)
        count = 0
        with bar:
            for group in self.inner.groups():
                yield group
                count += 1  # the engine has loaded the group
                bar.update(1)
        self._num_groups = count  # known after the first sync; later bars show a total


def source_config(engine: EngineConfig, trainer: TrainerConfig) -> SourceConfig:
    """How a recipe's source gathers: cast to the engine dtype, the `trainer:` section's gather budget and
    lockstep timeout."""
    return SourceConfig(dtype=getattr(torch, engine.dtype), bucket_bytes=trainer.bucket_bytes, timeout_s=trainer.timeout_s)


def sync_source(policy: torch.nn.Module, config: SourceConfig, *, progress: bool) -> WeightSource:
    """The source a recipe syncs from: `source_for(policy, config)` with a progress bar.

    `policy` is the trainer's model as its backend wraps it (plain, DDP, FSDP1/2,
    a DeepSpeed engine).
    """
    return ProgressSource(source_for(policy, config), enabled=progress)
