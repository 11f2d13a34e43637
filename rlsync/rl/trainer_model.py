"""The trainer's copy of the policy: a Hugging Face causal LM from a local path, a hub id or a built-in tiny model.

`model.path: null` means a built-in tiny checkpoint that `rlsync.default_model`
builds locally (no download): the family `model.builtin` names (`qwen2` by
default, `qwen3_moe` for a tiny MoE, any of `FAMILIES`).

`model.path` may be a Hugging Face hub id (`Qwen/Qwen2.5-0.5B-Instruct`, an
`org/name` that is not a local path). `resolve_model_path` turns it into the
local snapshot directory through `huggingface_hub`, and the trainer, the
tokenizer and the vLLM engine all load that directory. The local cache comes
first: a model already in the cache (`HF_HUB_CACHE`, or `HF_HOME/hub`) is used
as it is, without asking the hub, so a run and its resume train the same
revision and a cached model needs no network; `hf download ID` updates the
cache. Only a model missing from the cache is downloaded (`snapshot_download`:
config, tokenizer and `*.safetensors` files, no pickled `*.bin` weights), and
with `HF_HUB_OFFLINE=1` it is a `ConfigError` naming `model.path` instead.

Limitations:
1. A hub id is `org/name`; a one-part legacy id (`gpt2`) is taken as a local
   path (use `openai-community/gpt2`).
2. No revision pinning beyond the cache: pass the snapshot directory
   (`.../snapshots/<commit>`) as `model.path` to train one revision for sure.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
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
    """Local Hugging Face checkpoint directory or hub id (`Qwen/Qwen2.5-0.5B-Instruct`: the local cache first,
    downloaded only when missing, never with HF_HUB_OFFLINE=1); null = the built-in tiny model of family `builtin`
    (built locally)."""
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
    """`ConfigError` naming `model.path` unless it is (or its hub id resolves to) a Hugging Face checkpoint with
    safetensors weights.

    Checked at run start, before the run directory is written (a GPU config is
    validated on machines without the model); a hub id missing from the cache
    is downloaded here. Only `*.safetensors` weights are accepted: they hold
    tensors and nothing else, unlike pickled `*.bin` files.
    """
    if config.path is None:
        return
    path = Path(resolve_model_path(config))
    where = config.path if str(path) == config.path else f"{config.path} (cached at {path})"
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path: {where} is not a Hugging Face checkpoint directory (no config.json); "
                          f"point it at a local copy of the model or a hub id (org/name)")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"model.path: {where} holds config.json but no weights (no *.safetensors file); "
                          f"copy the whole checkpoint, or convert *.bin weights to safetensors")


HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
"""What a hub snapshot needs for the trainer, the tokenizer and vLLM (plus `*.py` with trust_remote_code)."""
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def is_hub_id(path: str) -> bool:
    """`path` names a model on the Hugging Face hub (`org/name`) rather than a local directory (one that exists
    is always local)."""
    return bool(_HUB_ID.fullmatch(path)) and ".." not in path and not Path(path).expanduser().exists()


def resolve_model_path(config: ModelConfig) -> str:
    """The local checkpoint directory: `model.path`, its hub snapshot (cache first, downloaded only when missing),
    or the built-in tiny model's directory (built on first use) when it is null."""
    if config.path is None:
        return str(tiny_model_path(config.builtin_spec()))
    if not is_hub_id(config.path):
        return config.path
    cached = cached_snapshot(config)
    return str(cached) if cached is not None else str(_download(config))


def cached_snapshot(config: ModelConfig) -> Path | None:
    """The hub id's snapshot directory in the local cache, or None; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(config.path, local_files_only=True, allow_patterns=_hub_files(config)))
    except (LocalEntryNotFoundError, HFValidationError):  # IncompleteSnapshotError is a LocalEntryNotFoundError
        return None


def _download(config: ModelConfig) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    cache = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"model.path: {config.path} is not a local directory, and as a hub id it is not in {cache}; "
                          f"HF_HUB_OFFLINE=1 forbids downloading it. Download it where the hub is reachable "
                          f"(.venv/bin/hf download {config.path}) or point model.path at a local copy")
    try:
        return Path(snapshot_download(config.path, allow_patterns=_hub_files(config)))
    except (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError, OSError) as exc:
        raise ConfigError(f"model.path: {config.path} is not a local directory, not in {cache}, and downloading it "
                          f"from the hub failed: {type(exc).__name__}: {exc}") from exc


def _hub_files(config: ModelConfig) -> list[str]:
    return HUB_FILES + (["*.py"] if config.trust_remote_code else [])


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
