"""Which quantization configs rlsync's reload backend supports, as explicit data.

A config is listed only when reloading through it has been checked bit for bit
against vLLM's own layerwise reload (tests/integration/test_reload_differential.py).
The reload package owns this list: rlsync's own FP8 plugin (`rlsync_fp8`) is in
it because its linear method implements the quantize-on-arrival protocol
(`rlsync.reload.layer.ArrivalLayer`); everything else gets an error naming the
alternative.
"""

from __future__ import annotations

from rlsync.errors import ConfigError
from rlsync.quant.fp8_linear import NAME as RLSYNC_FP8

ONLINE_RELOAD_QUANT_CONFIGS: frozenset[str | None] = frozenset({None, "fp8_per_channel", RLSYNC_FP8})
"""vLLM `quantization=` values the `rlsync` backend reloads (None: unquantized)."""


def check_supported(quantization: str | None) -> None:
    """`ConfigError` unless the `rlsync` reload backend supports `quantization`."""
    if quantization not in ONLINE_RELOAD_QUANT_CONFIGS:
        supported = ", ".join(sorted(repr(q) for q in ONLINE_RELOAD_QUANT_CONFIGS))
        raise ConfigError(
            f"reload_backend='rlsync' does not support quantization={quantization!r} "
            f"(supported: {supported}); use reload_backend='vllm' (vLLM's layerwise reload) for this config"
        )
