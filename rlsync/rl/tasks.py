"""Synthetic tasks with programmatic rewards that a tiny random model can learn.

Why synthetic: the built-in model is random and tiny, and nothing may be
downloaded, so the task must be learnable from scratch in minutes on a CPU and
its reward computable from the text alone. `vowels` rewards the fraction of
completion characters that are vowels: a random policy scores ~0.08 (5 of 64
tokens), a policy that learned the task approaches 1.0, so progress is visible.

What it does not do: measure anything about language ability.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Literal

from rlsync.errors import ConfigError

VOWELS = frozenset("aeiou")
_LETTERS = "bcdfghjklmnpqrstvwxyz"


@dataclasses.dataclass(kw_only=True, slots=True)
class TaskConfig:
    """Which synthetic task to train on."""

    name: Literal["vowels"] = "vowels"
    """`vowels`: reward = fraction of completion characters that are vowels."""
    prompt_length: int = 6
    """Characters in each random prompt."""

    def validate(self) -> None:
        if self.prompt_length < 1:
            raise ConfigError(f"task.prompt_length must be >= 1, got {self.prompt_length}")


class VowelTask:
    """Random consonant prompts; reward the share of vowels in the completion."""

    def __init__(self, config: TaskConfig, seed: int) -> None:
        self.config = config
        self.rng = random.Random(seed)

    def prompts(self, num: int) -> list[str]:
        n = self.config.prompt_length
        return ["".join(self.rng.choice(_LETTERS) for _ in range(n)) + ":" for _ in range(num)]

    @staticmethod
    def reward(completion: str) -> float:
        if not completion:
            return 0.0
        return sum(ch in VOWELS for ch in completion) / len(completion)

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))


def make_task(config: TaskConfig, seed: int) -> VowelTask:
    return VowelTask(config, seed)
