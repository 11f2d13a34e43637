"""`RLSyncCallback`: FP8 colocated rollouts for trl's `GRPOTrainer` and `RLOOTrainer`.

    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, train_dataset=dataset,
        args=GRPOConfig(use_vllm=True, vllm_mode="colocate", ...),
        callbacks=[RLSyncCallback(quantization="fp8_per_channel", verify_every=10)],
    )

Why: trl 1.16's colocate mode builds a bf16 engine and syncs it with one
`load_weights` call per parameter (after merging LoRA over the whole gathered
model), which FP8 engines reject. With this callback the trainer's
colocated engine is an rlsync `VLLMEngine` in the chosen layout, and every
sync streams the weights as layer groups from whatever trl prepared (plain,
DDP, FSDP1/2, ZeRO-3, PEFT/LoRA merged one group at a time: `source_for`),
quantizing on arrival. Each sync's `SyncReport` goes through trl's own
metrics, so `sync/seconds`, `sync/gbps`, `sync/groups`, ... appear in
`trainer.state.log_history` and every configured reporter, with two of trl's
own metrics also under the names rlsync's recipes give them
(`logprob_mismatch`, `step_seconds`; `RLSyncCallback.metric_names`).

Sleep mode (`vllm_enable_sleep_mode=True`) keeps trl's memory schedule: the
engine sleeps at level 2 (weights and KV cache released) while the trainer
steps; before a rollout the weights wake first, the sync refills them, then
trl wakes the KV cache, samples and puts the engine back to sleep. A rollout
is refused (`EngineNotReady`) unless the engine holds the trainer's current
step from one complete sync, so discarded or stale weights are never sampled.

Importance sampling: FP8 rollouts sample from a slightly different policy
than the bf16/fp32 trainer computes. trl corrects for exactly this mismatch
with `vllm_importance_sampling_correction=True` (GRPOConfig's default in
1.16): it compares the engine's log-probs of the sampled tokens with the
trainer's own and reweights (`vllm_importance_sampling_mode`, e.g.
`token_truncate` with `vllm_importance_sampling_clip_max=2.0`). The engine
reports `processed_logprobs` (after temperature), which is what that ratio
needs. Keep it on with FP8; `sampling/sampling_logp_difference/mean` in the
logs shows how far apart the two policies are. (RLOO in trl 1.16 takes no
rollout log-probs, so it has no such correction.)

Limitations:
1. trl >=1.16.0,<1.17.0, `vllm_mode="colocate"`, tensor parallel size 1
   (see `rlsync.adapters.trl`, the only module that touches trl's internals).
2. The engine loads its initial weights from `model.name_or_path` (or
   `model_path`), which must be a local Hugging Face checkpoint directory
   with the trainer's architecture; later weights always come from the trainer.
3. vLLM's CPU build has no sleep mode ("Sleep mode is not supported on
   current platform."); there sleep mode needs a GPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import TrainerCallback

from rlsync.adapters import trl as trl_adapter
from rlsync.engine import EngineConfig, EngineState, SyncReport, VLLMEngine
from rlsync.errors import ConfigError, EngineNotReady


@dataclasses.dataclass(kw_only=True, slots=True)
class RLSyncConfig:
    """How the callback builds and syncs the colocated engine."""

    quantization: str | None = "fp8_per_channel"
    """Engine layout: None (bf16), `fp8_per_channel` (vLLM online FP8) or `rlsync_fp8` (see `fp8_scheme`)."""
    fp8_scheme: str | None = None
    """`rlsync_fp8` only: scale granularity `tensor`, `channel` or `block` (None = channel)."""
    reload_backend: str = "rlsync"
    """`rlsync` (capture/restore, quantize on arrival) or `vllm` (vLLM's layerwise reload)."""
    verify_every: int = 0
    """Prove every N-th sync bit for bit against the reference quantization (0 = never)."""
    reject_nonfinite: bool = False
    """Fail a sync that receives NaN or Inf instead of loading it."""
    enforce_eager: bool = True
    """No CUDA graph capture (graphs stay valid across syncs, so False is safe on GPU)."""
    model_path: str | None = None
    """Checkpoint the engine starts from; None = the trainer model's `name_or_path`."""
    llm_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Extra `vllm.LLM` arguments; they override what trl would pass."""

    def __post_init__(self) -> None:
        if self.verify_every < 0:
            raise ConfigError(f"verify_every must be >= 0, got {self.verify_every}")
        self.engine_config(None).check()  # the engine's rules, checked where they live

    def engine_config(self, settings: trl_adapter.TrlVLLMSettings | None) -> EngineConfig:
        """The engine trl's `settings` ask for, in this config's layout (None: placeholders, for checking)."""
        llm_kwargs = dict(settings.llm_kwargs) if settings is not None else {}
        trust_remote_code = bool(llm_kwargs.pop("trust_remote_code", False))
        llm_kwargs.update(self.llm_kwargs)
        trl_keys = {} if settings is None else {
            "gpu_memory_utilization": settings.gpu_memory_utilization,
            "enable_sleep_mode": settings.enable_sleep_mode,
            "seed": settings.seed,
            "max_model_len": settings.max_model_len,  # None as in trl: vLLM infers it from the model config
            "tensor_parallel_size": settings.tensor_parallel_size,
        }
        return EngineConfig(
            model=self.model_path or (settings.model if settings is not None else ""),
            quantization=self.quantization,
            fp8_scheme=self.fp8_scheme,  # type: ignore[arg-type]
            reload_backend=self.reload_backend,
            reject_nonfinite=self.reject_nonfinite,
            enforce_eager=self.enforce_eager,
            trust_remote_code=trust_remote_code,
            llm_kwargs=llm_kwargs,
            **trl_keys,
        )


class RLSyncCallback(TrainerCallback):
    """Give a trl GRPO/RLOO trainer an rlsync engine: FP8 rollouts, layer-group sync, SyncReport logs.

    Pass it in `callbacks=[...]` when constructing the trainer (it must be
    there before trl builds its vLLM engine). `engine` is the `VLLMEngine`
    once the trainer is built; `reports` holds every sync's `SyncReport`;
    `metric_names` maps a name to a metric trl logs, which is then logged
    under that name too (rlsync's names by default; add to it before training).
    """

    def __init__(self, config: RLSyncConfig | None = None, **kwargs: Any) -> None:
        trl_adapter.check_trl_version()
        if config is not None and kwargs:
            raise ConfigError("pass either an RLSyncConfig or keyword arguments, not both")
        self.config = config if config is not None else RLSyncConfig(**kwargs)
        trl_adapter.install()
        self.engine: VLLMEngine | None = None
        self.reports: list[SyncReport] = []
        self.metric_names: dict[str, str] = dict(trl_adapter.RLSYNC_NAMES)
        self._pending: list[dict[str, float]] = []
        self._state = None  # the trainer's TrainerState (global_step), replaced by train()
        self._claimed = None

    # ---------------------------------------------------------- trainer events
    def on_init_end(self, args, state, control, model=None, **kwargs):
        trl_adapter.check_trainer_args(args)
        if self.engine is not None or self._claimed is not None:
            raise ConfigError("an RLSyncCallback serves one trainer; create one per trainer")
        trl_adapter.claim(model, self)
        self._claimed, self._state = model, state

    def on_train_begin(self, args, state, control, **kwargs):
        self._state = state
        self._require_engine()

    # ------------------------------------------- called by trl_adapter only
    def build_engine(self, settings: trl_adapter.TrlVLLMSettings) -> VLLMEngine:
        self.engine = VLLMEngine(self.config.engine_config(settings))
        self._claimed = None
        return self.engine

    def sync(self, model: Any) -> SyncReport:
        """Push the trainer's current weights (every `verify_every`-th sync also verified)."""
        engine = self._require_engine()
        count = len(self.reports) + 1
        verify = self.config.verify_every > 0 and count % self.config.verify_every == 0
        report = engine.sync(model, step=self._global_step(), verify=verify)
        self.reports.append(report)
        self._pending.append(report.metrics())
        return report

    def check_ready(self) -> None:
        """Raise `EngineNotReady` unless the engine holds the trainer's current step from a complete sync."""
        engine = self._require_engine()
        if engine.state is not EngineState.READY:
            raise EngineNotReady(f"engine is {engine.state.value} (last error: {engine.error}); refusing to sample")
        if engine.step != self._global_step():
            raise EngineNotReady(
                f"engine holds step {engine.step} weights but the trainer is at step {self._global_step()}"
            )

    def drain_metrics(self) -> list[dict[str, float]]:
        pending, self._pending = self._pending, []
        return pending

    # ------------------------------------------------------------- helpers
    def _global_step(self) -> int:
        return 0 if self._state is None else int(self._state.global_step)

    def _require_engine(self) -> VLLMEngine:
        if self.engine is None:
            if self._claimed is not None:
                trl_adapter.unclaim(self._claimed)
                self._claimed = None
            raise ConfigError(
                "RLSyncCallback's engine was never built: add the callback when constructing a trl "
                "GRPOTrainer or RLOOTrainer with use_vllm=True, vllm_mode='colocate'"
            )
        return self.engine
