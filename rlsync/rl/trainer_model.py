"""The trainer's copy of the policy: a Hugging Face causal LM from a local path."""

from __future__ import annotations

import copy
import dataclasses
from typing import Literal

import torch


@dataclasses.dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The policy checkpoint the trainer and the engine both start from."""

    path: str | None = None
    """Local Hugging Face checkpoint directory; null = the built-in tiny Qwen2 (built locally)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Trainer parameter dtype (the engine runs bf16 / FP8 regardless)."""


def resolve_model_path(config: ModelConfig) -> str:
    if config.path is None:
        from rlsync.testing import tiny_model_path

        return str(tiny_model_path())
    return config.path


def load_trainer_model(config: ModelConfig):
    """(model, path, tokenizer) for the trainer, loaded from the local checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(config)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, config.dtype))
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, path, tokenizer


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen, eval-mode copy of `model` (the KL reference: the policy as it started)."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref
