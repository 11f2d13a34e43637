"""Checks across config sections and the model's `config.json`, before anything is built.

Why: some settings are each valid alone and impossible together, and vLLM
would only say so after a minute of start-up (or, on a GPU box, after loading
a model): a block-FP8 layout whose block height splits a fused q/k/v or
gate/up projection, a context longer than the model's positions, prompts that
cannot fit the engine's context. These checks read only the model's
`config.json` (cheap) and raise `ConfigError` naming the key to change.

`check_run` is called twice: when the config loads (with `model.path` not yet
existing, as in a GPU config validated on a laptop, the model checks are
skipped) and at the start of a run, once the path must exist.

Limitations:
1. Fused-projection widths are derived for Llama/Qwen-style configs
   (`num_attention_heads`, `num_key_value_heads`, `head_dim`,
   `intermediate_size`); other architectures get the engine-only checks.
2. The prompt-length bound assumes at most one token per prompt character plus
   special tokens, true of the built-in character tokenizer and of BPE
   tokenizers on the synthetic prompts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from rlsync.engine.engine import EngineConfig, fp8_hf_overrides
from rlsync.errors import ConfigError
from rlsync.quant.plugin import NAME as RLSYNC_FP8
from rlsync.reload.support import check_supported
from rlsync.rl.trainer_model import ModelConfig

RELOAD_BACKENDS = ("rlsync", "vllm")
_PROMPT_SPECIALS = 3  # the task's ":" separator plus BOS/EOS a tokenizer may add


def model_config(model: ModelConfig) -> dict[str, Any] | None:
    """The model's `config.json` as a dict; None if `model.path` does not exist yet."""
    if model.path is None:
        from rlsync.testing import TinyModelSpec

        spec = TinyModelSpec()
        return {**dataclasses.asdict(spec), "head_dim": spec.hidden_size // spec.num_attention_heads}
    path = Path(model.path) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"model.path: {path} is not valid JSON: {exc}") from exc


def fp8_config(engine: EngineConfig):
    """The `rlsync_fp8` scheme the engine will use (`engine.fp8_scheme` / `fp8_options`, or
    `engine.llm_kwargs.hf_overrides`), or None."""
    if engine.quantization != RLSYNC_FP8:
        if engine.fp8_scheme is not None or engine.fp8_options:
            raise ConfigError(f"engine.fp8_scheme / engine.fp8_options apply to quantization={RLSYNC_FP8!r} only")
        return None
    from rlsync.quant.fp8_linear import Fp8Config

    overrides = fp8_hf_overrides(engine) or engine.llm_kwargs.get("hf_overrides", {})
    if not isinstance(overrides, dict):
        raise ConfigError("engine.llm_kwargs.hf_overrides: expected a mapping")
    raw = overrides.get("quantization_config", {"quant_method": RLSYNC_FP8})
    if not isinstance(raw, dict):
        raise ConfigError("engine.llm_kwargs.hf_overrides.quantization_config: expected a mapping")
    if raw.get("quant_method", RLSYNC_FP8) != RLSYNC_FP8:
        raise ConfigError(f"engine.llm_kwargs.hf_overrides.quantization_config.quant_method: "
                          f"{raw['quant_method']!r} does not match engine.quantization={RLSYNC_FP8!r}")
    try:
        return Fp8Config.from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"engine.llm_kwargs.hf_overrides.quantization_config: {exc}") from exc


def fused_widths(config: dict[str, Any]) -> dict[str, list[int]]:
    """Row widths of the checkpoint tensors each fused projection is built from."""
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if not heads or not hidden:
        return {}
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    out = {"qkv_proj": [heads * head_dim, kv * head_dim, kv * head_dim]}
    if config.get("intermediate_size"):
        out["gate_up_proj"] = [config["intermediate_size"]] * 2
    return out


def check_engine(engine: EngineConfig) -> None:
    """Engine keys that are wrong whatever the model."""
    if engine.reload_backend not in RELOAD_BACKENDS:
        raise ConfigError(f"engine.reload_backend: {engine.reload_backend!r} is not one of "
                          f"{', '.join(RELOAD_BACKENDS)}")
    if engine.reload_backend == "rlsync" and engine.quantization != RLSYNC_FP8:  # the plugin registers itself
        try:
            check_supported(engine.quantization)
        except ConfigError as exc:
            raise ConfigError(f"engine.reload_backend: {exc}") from exc
    if engine.max_model_len < 2:
        raise ConfigError(f"engine.max_model_len must be >= 2, got {engine.max_model_len}")
    if not 0 < engine.gpu_memory_utilization <= 1:
        raise ConfigError(f"engine.gpu_memory_utilization must be in (0, 1], got {engine.gpu_memory_utilization}")
    for key in ("quantization", "dtype", "max_model_len", "seed", "enforce_eager", "enable_sleep_mode"):
        if key in engine.llm_kwargs:
            raise ConfigError(f"engine.llm_kwargs.{key}: set engine.{key} instead")
    fp8_config(engine)  # validates the scheme's keys even before the model is known


def check_run(model: ModelConfig, engine: EngineConfig, *, prompt_length: int, max_tokens: int,
              section: str) -> None:
    """Every cross-section check; model checks only once `model.path` exists (or is the built-in model)."""
    check_engine(engine)
    longest = prompt_length + _PROMPT_SPECIALS + max_tokens
    if longest > engine.max_model_len:
        raise ConfigError(f"engine.max_model_len: {engine.max_model_len} cannot hold a prompt of task.prompt_length="
                          f"{prompt_length} (+{_PROMPT_SPECIALS} tokens) and {section}.max_tokens={max_tokens}")
    config = model_config(model)
    if config is None:
        return
    positions = config.get("max_position_embeddings")
    if positions and engine.max_model_len > positions:
        raise ConfigError(f"engine.max_model_len: {engine.max_model_len} exceeds the model's max_position_embeddings "
                          f"({positions}, {model.path or 'built-in tiny model'})")
    fp8 = fp8_config(engine)
    if fp8 is not None and fp8.scheme == "block":
        from rlsync.quant.fp8_linear import check_shards

        for layer, widths in fused_widths(config).items():
            try:
                check_shards(fp8, widths)
            except ConfigError as exc:
                key = "engine.fp8_options.block" if engine.fp8_scheme or engine.fp8_options else \
                    "engine.llm_kwargs.hf_overrides.quantization_config.block"
                raise ConfigError(f"{key}: {fp8.block} does not "
                                  f"fit {layer} (shards {widths}) of {model.path or 'the built-in tiny model'}: {exc}"
                                  ) from exc
