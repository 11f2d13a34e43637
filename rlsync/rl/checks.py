"""Checks across config sections and the model's `config.json`, before anything is built.

Why: some settings are each valid alone and impossible together, and vLLM
would only say so after a minute of start-up (or, on a GPU box, after loading
a model): a context longer than the model's positions, prompts that cannot fit
the engine's context. (A block-FP8 block that straddles two fused shards is no
longer a misfit: `rlsync_fp8` completes it when both shards have arrived.) These checks read only the model's
`config.json` (cheap) and raise `ConfigError` naming the key to change.

`check_run` is called twice: when the config loads (with `model.path` not yet
existing, as in a GPU config validated on a laptop, or a hub id not yet in the
local cache, the model checks are skipped; nothing is downloaded to validate a
config) and at the start of a run, once the path must exist.

Limitations:
1. The prompt-length bound is `task.prompt_length` tokens plus special tokens:
   exact for a dataset task (it skips longer prompts, counted in tokens), and
   for `vowels` (characters) true of the built-in character tokenizer and of
   BPE tokenizers on its consonant prompts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from rlsync.engine import EngineConfig
from rlsync.errors import ConfigError
from rlsync.rl.trainer_model import ModelConfig, cached_snapshot, is_hub_id

_PROMPT_SPECIALS = 3  # the task's ":" separator plus BOS/EOS a tokenizer may add


def model_config(model: ModelConfig) -> dict[str, Any] | None:
    """The model's `config.json` as a dict; None if `model.path` does not exist yet (or is a hub id not cached)."""
    if model.path is None:  # the built-in model's shape, from its spec: nothing is built to validate a config
        spec = model.builtin_spec()
        return {**dataclasses.asdict(spec), "head_dim": spec.head_dim}
    local = cached_snapshot(model) if is_hub_id(model.path) else Path(model.path)
    if local is None:
        return None
    path = local / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"model.path: {path} is not valid JSON: {exc}") from exc


def check_run(model: ModelConfig, engine: EngineConfig, *, prompt_length: int, max_tokens: int,
              section: str) -> None:
    """Every cross-section check; model checks only once `model.path` exists (or is the built-in model).

    Engine-only rules live in `EngineConfig.check`, called here first.
    """
    engine.check()
    if engine.trust_remote_code:
        raise ConfigError("engine.trust_remote_code: set model.trust_remote_code instead (one switch for the trainer "
                          "and the engine, off by default)")
    longest = prompt_length + _PROMPT_SPECIALS + max_tokens
    if engine.max_model_len is not None and longest > engine.max_model_len:
        raise ConfigError(f"engine.max_model_len: {engine.max_model_len} cannot hold a prompt of task.prompt_length="
                          f"{prompt_length} (+{_PROMPT_SPECIALS} tokens) and {section}.max_tokens={max_tokens}")
    config = model_config(model)
    if config is None:
        return
    positions = config.get("max_position_embeddings")
    if positions and engine.max_model_len is not None and engine.max_model_len > positions:
        raise ConfigError(f"engine.max_model_len: {engine.max_model_len} exceeds the model's max_position_embeddings "
                          f"({positions}, {model.path or f'built-in tiny {model.builtin} model'})")
