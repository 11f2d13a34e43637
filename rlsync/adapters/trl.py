"""The one module that touches trl's internals, with the version check.

trl 1.16's colocate mode builds a bf16 `vllm.LLM` inside `VLLMGeneration`
and syncs it with one `load_weights` call per parameter (which an FP8 engine
rejects, and which on vLLM's CPU build fails even in bf16 because the CPU
kernels repack the weights). trl offers no hook to replace either, so this
module replaces exactly these attributes, and nothing else:

1. `trl.generation.vllm_generation.VLLMGeneration._init_vllm` (class
   attribute, wrapped once): when the trainer's model was claimed by an
   `RLSyncCallback` (in `on_init_end`, which trl's trainers run before they
   build `VLLMGeneration`), colocate mode builds the callback's `VLLMEngine`
   from the settings trl would have given `vllm.LLM` (`settings_from`) and
   stores `engine.llm` where trl keeps its LLM (`generation.llm`). Unclaimed
   models run trl's original method.
2. On that `VLLMGeneration` instance only: `sync_weights` (layer groups
   through `VLLMEngine.sync`, then a prefix-cache reset) and `generate`
   (re-push weights that a level-2 sleep discarded, refuse weights that are
   not from the trainer's current step, then trl's own `generate`, which
   wakes the KV cache, samples and sleeps again).
3. `GRPOTrainer.log` and `RLOOTrainer.log` (class attributes, wrapped once):
   the SyncReport metrics recorded since the last log are appended to the
   trainer's `_metrics` before trl averages them, so they reach
   `state.log_history` and every reporter like trl's own metrics; so do the
   trl metrics the host wants under another name too (`Host.metric_names`,
   by default `RLSYNC_NAMES`: the same values again, under rlsync's name). A
   class attribute because a
   callback never receives the trainer object; trainers without an rlsync
   engine pass straight through.

Limitations:
1. trl >=1.16.0,<1.17.0 only (checked; `check_trl_version`).
2. `vllm_mode="colocate"` (any `vllm_tensor_parallel_size`: k consecutive ranks share one engine): one engine per
   rank, each syncing from its rank's `WeightSource`.
3. bitsandbytes-quantized trainer models are refused (their parameters are
   packed 4/8-bit storage, not weights an FP8 engine can re-quantize).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import weakref
from typing import Any, Protocol

from packaging.version import Version

from rlsync.errors import ConfigError

SUPPORTED_TRL = (Version("1.16.0"), Version("1.17.0"))
"""trl releases this module was written against: [low, high)."""
SUPPORTED_RANGE = f">={SUPPORTED_TRL[0]},<{SUPPORTED_TRL[1]}"
RLSYNC_NAMES = {
    "logprob_mismatch": "sampling/sampling_logp_difference/mean",
    "step_seconds": "step_time",
}
"""rlsync's metric name -> trl 1.16's name for the same quantity (mean |trainer - engine| log-prob per sampled
token; seconds per optimizer step, rollout and sync included), so a dashboard reads rlsync's recipes and trl's
alike."""

_WRAPPED = "__rlsync_wrapped__"
_HOST = "_rlsync_host"
# trainer model -> the callback that will own its engine (set in on_init_end, taken in _init_vllm)
_CLAIMS: "weakref.WeakKeyDictionary[Any, Host]" = weakref.WeakKeyDictionary()


class Host(Protocol):
    """What an `RLSyncCallback` provides to the replaced trl methods."""

    engine: Any
    metric_names: dict[str, str]
    """Another name -> trl's name of a metric trl logs: logged again under the other name."""

    def build_engine(self, settings: "TrlVLLMSettings") -> Any: ...
    def sync(self, model: Any) -> Any: ...
    def check_ready(self) -> None: ...
    def drain_metrics(self) -> list[dict[str, float]]: ...


@dataclasses.dataclass(kw_only=True, slots=True, frozen=True)
class TrlVLLMSettings:
    """What trl 1.16 would have passed to `vllm.LLM` in colocate mode."""

    model: str
    """`model.name_or_path` of the trainer's model (a local checkpoint directory)."""
    gpu_memory_utilization: float
    """`vllm_gpu_memory_utilization`."""
    max_model_len: int | None
    """`vllm_max_model_length` (None: vLLM infers it from the model config)."""
    enable_sleep_mode: bool
    """`vllm_enable_sleep_mode`."""
    seed: int
    """trl's sampling seed: the rank's index among tensor-parallel groups."""
    tensor_parallel_size: int
    """`vllm_tensor_parallel_size`: consecutive ranks per engine (trl gathers each group's prompts itself)."""
    llm_kwargs: dict[str, Any]
    """The remaining `vllm.LLM` arguments trl sets (batch limits, model impl, ...); trl's executor backend is
    rlsync's to set (`EngineConfig.tensor_parallel_size`)."""


def check_trl_version() -> str:
    """The installed trl version; `ConfigError` naming the supported range otherwise."""
    import trl

    found = Version(trl.__version__)
    if not SUPPORTED_TRL[0] <= found < SUPPORTED_TRL[1]:
        raise ConfigError(
            f"rlsync.integrations.trl supports trl {SUPPORTED_RANGE}; found trl {trl.__version__}. "
            f"Install a supported trl (pip install 'trl{SUPPORTED_RANGE}')."
        )
    return trl.__version__


def check_trainer_args(args: Any) -> None:
    """The trainer runs vLLM colocated, one engine per rank (the only mode rlsync takes over)."""
    if not hasattr(args, "use_vllm"):
        raise ConfigError(f"RLSyncCallback needs a trl GRPOConfig or RLOOConfig, got {type(args).__name__}")
    if not args.use_vllm:
        raise ConfigError("RLSyncCallback needs use_vllm=True (it replaces trl's vLLM engine)")
    if args.vllm_mode != "colocate":
        raise ConfigError(f"RLSyncCallback needs vllm_mode='colocate', got {args.vllm_mode!r}")


def install() -> None:
    """Wrap trl's `_init_vllm` and the trainers' `log` (idempotent; inert for unclaimed trainers)."""
    from trl.generation.vllm_generation import VLLMGeneration
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.rloo_trainer import RLOOTrainer

    if not getattr(VLLMGeneration._init_vllm, _WRAPPED, False):
        VLLMGeneration._init_vllm = _wrap_init_vllm(VLLMGeneration._init_vllm)
    for trainer_cls in (GRPOTrainer, RLOOTrainer):
        if not getattr(trainer_cls.log, _WRAPPED, False):
            trainer_cls.log = _wrap_log(trainer_cls.log)


def claim(model: Any, host: Host) -> None:
    """Make the `VLLMGeneration` that trl builds next for `model` use `host`'s engine."""
    if model is None:
        raise ConfigError("RLSyncCallback.on_init_end received no model from the trainer")
    other = _CLAIMS.get(model)
    if other is not None and other is not host:
        raise ConfigError("this model is already claimed by another RLSyncCallback; use one per trainer")
    _CLAIMS[model] = host


def unclaim(model: Any) -> bool:
    """Drop a claim trl never took (True if there was one)."""
    return _CLAIMS.pop(model, None) is not None


def host_of(generation: Any) -> Host | None:
    """The callback that owns `generation`'s engine, if any."""
    return getattr(generation, _HOST, None)


def weights_sleeping(generation: Any) -> bool:
    """trl's flag: a level-2 sleep discarded the engine's weights and no sync has refilled them."""
    return bool(generation._llm_weights_sleeping)


def settings_from(generation: Any) -> TrlVLLMSettings:
    """The `vllm.LLM` settings trl 1.16's colocate branch derives from its `VLLMGeneration`."""
    model = generation.model
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise ConfigError("RLSyncCallback cannot sync a bitsandbytes-quantized trainer model (limitation 3)")
    accelerator = generation.accelerator
    return TrlVLLMSettings(
        model=str(model.name_or_path),
        gpu_memory_utilization=generation.gpu_memory_utilization,
        max_model_len=generation.max_model_length,
        enable_sleep_mode=generation.enable_sleep_mode,
        seed=accelerator.process_index // generation.tensor_parallel_size,
        tensor_parallel_size=generation.tensor_parallel_size,
        llm_kwargs={
            "max_num_seqs": generation.max_num_seqs,
            "model_impl": generation.model_impl,
            "max_num_batched_tokens": 4096,
            "trust_remote_code": generation.trust_remote_code,
        },
    )


# ------------------------------------------------------------ replacements
def _wrap_init_vllm(original):
    @functools.wraps(original)
    def _init_vllm(generation) -> None:
        host = _CLAIMS.pop(generation.model, None)
        if host is None:
            return original(generation)
        if generation.mode != "colocate":
            raise ConfigError(f"RLSyncCallback needs vllm_mode='colocate', got {generation.mode!r}")
        _init_rlsync_engine(generation, host)

    setattr(_init_vllm, _WRAPPED, True)
    return _init_vllm


def _init_rlsync_engine(generation, host: Host) -> None:
    from trl.trainer.utils import ensure_master_addr_port

    accelerator = generation.accelerator
    # as trl does: vLLM's external_launcher executor reads the rank layout from the environment
    os.environ["RANK"] = str(accelerator.process_index)
    os.environ["LOCAL_RANK"] = str(accelerator.local_process_index)
    os.environ["WORLD_SIZE"] = str(accelerator.num_processes)
    ensure_master_addr_port()
    engine = host.build_engine(settings_from(generation))
    generation.llm = engine.llm
    generation._llm_weights_sleeping = False
    if generation.enable_sleep_mode:
        engine.sleep(level=2)  # training runs first: release weights and KV cache until the first rollout
        generation._llm_weights_sleeping = True
    generation.sync_weights = functools.partial(_sync_weights, generation, host)
    generation.generate = functools.partial(_generate, generation, host, type(generation).generate)
    setattr(generation, _HOST, host)
    accelerator.wait_for_everyone()


def _sync_weights(generation, host: Host) -> None:
    """Wake the weights (sleep mode), sync every layer group, drop KV entries computed with old weights."""
    if generation.enable_sleep_mode:
        from trl.generation.vllm_generation import empty_cache

        empty_cache()  # as trl does before waking: room for the weights
        host.engine.wake_up(["weights"])  # the sync writes into the weights' storage, so they wake first
    host.sync(generation.model)
    generation._llm_weights_sleeping = False
    generation.llm.reset_prefix_cache()


def _generate(generation, host: Host, original, *args: Any, **kwargs: Any):
    """Never sample from discarded or stale weights; then trl's generate (wake KV cache, sample, sleep)."""
    if generation.enable_sleep_mode and weights_sleeping(generation):
        _sync_weights(generation, host)
    host.check_ready()
    return original(generation, *args, **kwargs)


def _wrap_log(original):
    @functools.wraps(original)
    def log(trainer, logs: dict[str, float], start_time: float | None = None) -> None:
        host = host_of(getattr(trainer, "vllm_generation", None))
        if host is not None:
            mode = "train" if trainer.model.training else "eval"  # the window trl is about to average
            for metrics in host.drain_metrics():
                for key, value in metrics.items():
                    trainer._metrics[mode][key].append(value)
            window = trainer._metrics[mode]
            for ours, theirs in host.metric_names.items():
                if theirs in window:
                    window[ours] = list(window[theirs])
        return original(trainer, logs, start_time)

    setattr(log, _WRAPPED, True)
    return log
