"""Entry point of the `rlsync_fp8` vLLM plugin, and the engine arguments that select it.

`pyproject.toml` registers `register` under `vllm.general_plugins`, so vLLM
calls it in every process it starts (this one, engine core, workers) before a
model is built. Importing this module imports no vLLM; `register` does.
"""

from __future__ import annotations

from typing import Any

from rlsync.quant.fp8_linear import NAME, Fp8Config

__all__ = ["NAME", "hf_overrides", "register"]


def register() -> None:
    """Make `quantization="rlsync_fp8"` available to vLLM (safe to call repeatedly)."""
    from rlsync.quant import vllm_plugin  # imports vLLM: only when vLLM loads its plugins

    vllm_plugin.register()


def hf_overrides(scheme: str = "channel", **options: Any) -> dict[str, Any]:
    """`hf_overrides` for `vllm.LLM(..., quantization="rlsync_fp8")` choosing the scheme.

    `options` are the other `Fp8Config` keys (`block`, `kernel`, `activation`);
    they are validated here, so a typo fails before vLLM starts.
    """
    return {"quantization_config": Fp8Config(scheme=scheme, **options).to_dict()}
