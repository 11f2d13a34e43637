"""`EngineConfig`: how to build the colocated vLLM engine, and every rule about it, in one place.

Why one place: the recipes, the trl callback and the Python API all build an
engine, and each rule (a valid `reload_backend`, FP8 options only with
`rlsync_fp8`, `llm_kwargs` that neither duplicate a typed key nor run code)
must read the same everywhere. `EngineConfig.check()` holds them all;
`VLLMEngine` calls it before building, and the recipes call it when a config
loads, so a bad setting fails before anything starts.

`llm_kwargs` is an allowlist (`LLM_KWARGS`): sizes and switches that change
no code path a file could choose. Anything that imports or executes code
(`trust_remote_code`, logits processors, custom classes, plugins by path) is
refused; `trust_remote_code` exists only as this config's explicit field
(default off, warned about when on).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Literal

from rlsync.errors import ConfigError
from rlsync.quant.fp8_linear import NAME as RLSYNC_FP8
from rlsync.quant.fp8_linear import Fp8Config
from rlsync.reload import RELOAD_BACKENDS, check_supported

LLM_KWARGS: dict[str, str] = {
    "hf_overrides": "a mapping of config.json keys (e.g. quantization_config for rlsync_fp8)",
    "max_num_seqs": "most sequences per engine step",
    "max_num_batched_tokens": "most tokens per engine step",
    "max_logprobs": "most log-probs a request may ask for",
    "kv_cache_dtype": "KV-cache storage dtype (auto, fp8, ...)",
    "block_size": "KV-cache block size",
    "swap_space": "CPU swap space per GPU (GiB)",
    "cpu_offload_gb": "weights offloaded to CPU (GiB)",
    "enable_prefix_caching": "reuse KV blocks of shared prompt prefixes",
    "enable_chunked_prefill": "split long prefills across steps",
    "model_impl": "auto, vllm or transformers",
    "disable_log_stats": "no periodic engine statistics",
}
"""`vllm.LLM` keyword arguments `engine.llm_kwargs` accepts, with what each is for."""

_TYPED_KEYS = ("quantization", "dtype", "max_model_len", "seed", "enforce_eager", "gpu_memory_utilization",
               "enable_sleep_mode", "trust_remote_code", "tensor_parallel_size")


@dataclasses.dataclass(kw_only=True, slots=True)
class EngineConfig:
    """How to build the colocated vLLM engine."""

    model: str = ""
    """Checkpoint directory (Hugging Face layout, safetensors)."""
    quantization: str | None = None
    """None (bf16), `fp8_per_channel` (vLLM online FP8) or `rlsync_fp8` (rlsync's plugin)."""
    reload_backend: str = "rlsync"
    """`rlsync` (capture/restore, quantize on arrival) or `vllm` (vLLM's layerwise reload)."""
    dtype: str = "bfloat16"
    """Engine compute dtype."""
    max_model_len: int | None = 512
    """Longest prompt + completion (None: vLLM takes the model's maximum)."""
    seed: int = 0
    """Sampling seed."""
    enforce_eager: bool = True
    """No graph capture (CPU); on GPU graphs stay valid since syncs keep data pointers."""
    gpu_memory_utilization: float = 0.3
    """Fraction of device memory for vLLM (GPU only)."""
    tensor_parallel_size: int = 1
    """Ranks per engine. k > 1: each group of k consecutive ranks (torchrun / deepspeed, torch.distributed
    initialized first) forms one engine through vLLM's `external_launcher`, each rank holding its shard; the
    world is data-parallel groups x k."""
    enable_sleep_mode: bool = False
    """Let the engine release memory between rollouts (`sleep` / `wake_up`)."""
    fp8_scheme: Literal["tensor", "channel", "block"] | None = None
    """With `quantization: rlsync_fp8`: FP8 scale granularity (null = channel)."""
    fp8_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """With `quantization: rlsync_fp8`: other plugin keys, e.g. `block: [128, 128]`, `kernel: emulated`."""
    sync_plan: bool = True
    """rlsync backend: record where each checkpoint tensor lands on the first sync and replay that on later syncs
    (`rlsync.reload.plan`); any change of engine tensors or incoming names, shapes or dtypes records again.
    False: every sync goes through vLLM's `load_weights`."""
    reject_nonfinite: bool = True
    """Fail a sync that receives NaN or Inf (FP8 layers: free, from the quantizer's scales; other tensors: one
    pass). False is an explicit opt-out; the sync after each unchecked one then zeroes the whole KV cache."""
    trust_remote_code: bool = False
    """Let vLLM run Python code shipped in the model directory (off; set only for models you trust)."""
    llm_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Extra `vllm.LLM` arguments from the allowlist `rlsync.engine.config.LLM_KWARGS`."""

    def check(self) -> None:
        """Every engine rule that holds whatever the model; `ConfigError` naming the key."""
        if self.reload_backend not in RELOAD_BACKENDS:
            raise ConfigError(f"engine.reload_backend: {self.reload_backend!r} is not one of {', '.join(RELOAD_BACKENDS)}")
        if self.reload_backend == "rlsync":
            try:
                check_supported(self.quantization)
            except ConfigError as exc:
                raise ConfigError(f"engine.reload_backend: {exc}") from exc
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"engine.max_model_len must be >= 2, got {self.max_model_len}")
        if isinstance(self.tensor_parallel_size, bool) or not isinstance(self.tensor_parallel_size, int) \
                or self.tensor_parallel_size < 1:
            raise ConfigError(f"engine.tensor_parallel_size must be an int >= 1, got {self.tensor_parallel_size!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"engine.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        self._check_llm_kwargs()
        self.fp8()  # validates the FP8 keys

    def _check_llm_kwargs(self) -> None:
        for key, value in self.llm_kwargs.items():
            if key == "distributed_executor_backend":
                raise ConfigError("engine.llm_kwargs.distributed_executor_backend: set by rlsync (vLLM's "
                                  "'external_launcher' when engine.tensor_parallel_size > 1); set engine.tensor_parallel_size")
            if key == "trust_remote_code":
                raise ConfigError("engine.llm_kwargs.trust_remote_code: refused here; it is an explicit option "
                                  "(model.trust_remote_code in a recipe config, EngineConfig.trust_remote_code in code)")
            if key in _TYPED_KEYS:
                raise ConfigError(f"engine.llm_kwargs.{key}: set engine.{key} instead")
            if key not in LLM_KWARGS:
                raise ConfigError(
                    f"engine.llm_kwargs.{key}: not an allowed vLLM argument (allowed: {', '.join(sorted(LLM_KWARGS))}); "
                    "arguments that load or run code (logits processors, custom classes, plugins) are refused"
                )
            if key == "hf_overrides" and not isinstance(value, dict):
                raise ConfigError("engine.llm_kwargs.hf_overrides: expected a mapping (a callable would run code)")

    def fp8(self) -> Fp8Config | None:
        """The `rlsync_fp8` scheme the engine will use (from `fp8_scheme` / `fp8_options`, or
        `llm_kwargs.hf_overrides.quantization_config`); None for other quantizations."""
        if self.quantization != RLSYNC_FP8:
            if self.fp8_scheme is not None or self.fp8_options:
                raise ConfigError(f"engine.fp8_scheme / engine.fp8_options apply to quantization={RLSYNC_FP8!r} only "
                                  f"(quantization is {self.quantization!r})")
            return None
        overrides = self.llm_kwargs.get("hf_overrides", {})
        if not isinstance(overrides, dict):
            raise ConfigError("engine.llm_kwargs.hf_overrides: expected a mapping")
        if self.fp8_scheme is not None or self.fp8_options:
            if "quantization_config" in overrides:
                raise ConfigError("engine.fp8_scheme: also set in engine.llm_kwargs.hf_overrides.quantization_config; keep one")
            try:
                return Fp8Config(scheme=self.fp8_scheme or "channel", **self.fp8_options)
            except (ConfigError, TypeError) as exc:
                raise ConfigError(f"engine.fp8_options: {exc}") from exc
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

    def fp8_key(self) -> str:
        """The config key that sets the FP8 block (for error messages)."""
        if self.fp8_scheme is not None or self.fp8_options:
            return "engine.fp8_options.block"
        return "engine.llm_kwargs.hf_overrides.quantization_config.block"

    def vllm_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for `vllm.LLM(self.model, ...)`, after `check()`."""
        self.check()
        if self.trust_remote_code:
            warnings.warn("engine.trust_remote_code=True: vLLM may run Python code from the model directory "
                          f"{self.model}", stacklevel=3)
        kwargs: dict[str, Any] = {
            "quantization": self.quantization,
            "dtype": self.dtype,
            "max_model_len": self.max_model_len,
            "seed": self.seed,
            "enforce_eager": self.enforce_eager,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "enable_sleep_mode": self.enable_sleep_mode,
            "trust_remote_code": self.trust_remote_code,
            "tensor_parallel_size": self.tensor_parallel_size,
            # log-probs of the distribution actually sampled (after temperature),
            # which is what the trainer's importance weights compare against
            "logprobs_mode": "processed_logprobs",
            **self.llm_kwargs,
        }
        if self.tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"  # the ranks torchrun / deepspeed started
        if self.fp8_scheme is not None or self.fp8_options:
            fp8 = self.fp8()
            assert fp8 is not None
            kwargs["hf_overrides"] = {**kwargs.get("hf_overrides", {}), "quantization_config": fp8.to_dict()}
        return kwargs
