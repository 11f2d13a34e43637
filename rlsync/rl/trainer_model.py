"""The trainer's copy of the policy: a Hugging Face causal LM from a local path or a built-in tiny model.

`model.path: null` means a built-in tiny checkpoint that `rlsync.default_model`
builds locally (no download): the family `model.builtin` names (`qwen2` by
default, `qwen3_moe` for a tiny MoE, any of `FAMILIES`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Literal

import torch

from rlsync.default_model import FAMILIES, TinyModelSpec, family_spec, tiny_model_path
from rlsync.errors import ConfigError

DEFAULT_BUILTIN = "qwen2"
"""`model.builtin` when a config leaves it out: the tiny Qwen2 every recipe started with."""


@dataclasses.dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The policy checkpoint the trainer and the engine both start from."""

    path: str | None = None
    """Local Hugging Face checkpoint directory; null = the built-in tiny model of family `builtin` (built locally)."""
    builtin: str = DEFAULT_BUILTIN
    """Family of the built-in tiny model used when `path` is null, one of `rlsync.default_model.FAMILIES` (qwen2,
    qwen3_moe, mixtral, ...); a family other than qwen2 together with a `path` is an error (set one or the other)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Trainer parameter dtype (the engine runs bf16 / FP8 regardless)."""
    device: str = "auto"
    """Trainer device: `auto` (this rank's GPU if there is one, else CPU), `cpu`, `cuda`, `cuda:N`."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory for larger models)."""
    trust_remote_code: bool = False
    """Let transformers and vLLM run Python code shipped in the model directory (off; on only for models you
    trust; the one switch for trainer and engine, warned about when on)."""

    def validate(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not (self.device.startswith("cuda:")
                                                              and self.device[5:].isdigit()):
            raise ConfigError(f"model.device: {self.device!r} is not auto, cpu, cuda or cuda:N")
        if self.builtin not in FAMILIES:
            raise ConfigError(f"model.builtin: {self.builtin!r} is not a built-in model family; one of "
                              f"{', '.join(FAMILIES)}")
        if self.path is not None and self.builtin != DEFAULT_BUILTIN:
            raise ConfigError(f"model.builtin: {self.builtin!r} names a built-in model, but model.path is set "
                              f"({self.path}); keep one: model.path=null for the built-in model, or drop "
                              f"model.builtin to train the checkpoint at model.path")

    def builtin_spec(self) -> TinyModelSpec:
        """The spec of the built-in tiny model (`builtin`'s family; meaningful when `path` is null)."""
        return family_spec(self.builtin)


def trainer_device(config: ModelConfig) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def require_model_path(config: ModelConfig) -> None:
    """`ConfigError` naming `model.path` unless it is a Hugging Face checkpoint with safetensors weights.

    Checked at run start, before the run directory is written (a GPU config is
    validated on machines without the model). Only `*.safetensors` weights are
    accepted: they hold tensors and nothing else, unlike pickled `*.bin` files.
    """
    if config.path is None:
        return
    path = Path(config.path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path: {config.path} is not a Hugging Face checkpoint directory (no config.json); "
                          f"point it at a local copy of the model")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"model.path: {config.path} holds config.json but no weights (no *.safetensors file); "
                          f"copy the whole checkpoint, or convert *.bin weights to safetensors")


def resolve_model_path(config: ModelConfig) -> str:
    """`model.path`, or the built-in tiny model's directory (built on first use) when it is null."""
    if config.path is None:
        return str(tiny_model_path(config.builtin_spec()))
    return config.path


def load_trainer_model(config: ModelConfig):
    """(model, path, tokenizer) for the trainer, loaded from the local checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_model_path(config)
    path = resolve_model_path(config)
    if config.trust_remote_code:
        warnings.warn(f"model.trust_remote_code=true: transformers and vLLM may run Python code from {path}",
                      stacklevel=2)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, config.dtype),
                                                 trust_remote_code=config.trust_remote_code)
    model.to(trainer_device(config))
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    return model, path, tokenizer


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen, eval-mode copy of `model` (the KL reference: the policy as it started)."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref
