"""`VLLMEngine`: a vLLM engine in the trainer's process that refuses stale weights.

Why a wrapper: a rollout must come from exactly one trainer step's weights. The
engine keeps a state machine (READY at step s / SYNCING / FAILED); a sync that
raises for any reason leaves it FAILED, and `generate` then raises
`EngineNotReady` instead of sampling from a half-updated model. The next full
sync brings it back to READY.

A sync validates each incoming tensor (known name, right shape, not yet seen,
finite if asked) before handing the group to the reload backend, and on commit
checks that every checkpoint tensor arrived exactly once.

What it does not do: launch processes (use torchrun / deepspeed) or own the
trainer model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from rlsync.adapters import vllm_engine, vllm_load
from rlsync.engine.checkpoint import checkpoint_shapes
from rlsync.engine.config import EngineConfig
from rlsync.engine.report import SyncReport
from rlsync.engine.verify import verify_groups
from rlsync.errors import ConfigError, EngineNotReady, SyncError
from rlsync.reload import ReloadBackend, Weights, capture, get_capture, make_backend
from rlsync.source import WeightSource, source_for


class EngineState(enum.Enum):
    READY = "ready"
    """Weights are exactly one sync's (or the checkpoint's, before the first sync)."""
    SYNCING = "syncing"
    """A sync is under way."""
    FAILED = "failed"
    """The last sync broke off; the weights may be mixed."""
    DISCARDED = "discarded"
    """`sleep(level=2)` dropped the weights; a full sync must come before sampling."""


@dataclasses.dataclass(kw_only=True, slots=True)
class Completion:
    """One sampled completion."""

    token_ids: list[int]
    logprobs: list[float]
    """Log-probability of each sampled token under the engine's (unprocessed) distribution."""
    text: str


@dataclasses.dataclass(kw_only=True, slots=True)
class PromptResult:
    prompt_token_ids: list[int]
    completions: list[Completion]


class VLLMEngine:
    """A colocated vLLM engine with fail-closed weight sync."""

    def __init__(self, config: EngineConfig | str, /, **overrides: Any) -> None:
        """Build from an `EngineConfig`, or from a checkpoint path plus `EngineConfig` keys.

        `VLLMEngine(EngineConfig(model=path, ...))` and `VLLMEngine(path, quantization=...)`
        are the same engine; the config is checked (`EngineConfig.check`) before vLLM starts.
        """
        if isinstance(config, EngineConfig):
            if overrides:
                raise ConfigError(f"VLLMEngine: pass an EngineConfig or keyword arguments, not both ({sorted(overrides)})")
        else:
            config = EngineConfig(model=str(config), **overrides)
        self.config = cfg = config
        llm_kwargs = cfg.vllm_kwargs()
        # Capture the load format as vLLM builds the model, whichever backend runs
        # now: the rlsync backend needs it and a caller may switch backends later.
        with vllm_load.capture_at_load(capture):
            self.llm = vllm_engine.build_llm(cfg.model, **llm_kwargs)
        self.model = vllm_engine.driver_model(self.llm)
        get_capture(self.model)  # fails loudly if vLLM stopped calling the capture hook
        self.packed = vllm_engine.packed_modules_mapping(self.model)
        self.checkpoint_shapes = checkpoint_shapes(cfg.model)
        self.backend: ReloadBackend = make_backend(cfg.reload_backend, self.model, vllm_engine.model_config(self.llm))
        self.state = EngineState.READY
        self.step = 0
        self.error: BaseException | None = None

    @classmethod
    def from_config(cls, config: EngineConfig) -> "VLLMEngine":
        """The engine `config` describes (same as `VLLMEngine(config)`)."""
        return cls(config)

    @property
    def tokenizer(self):
        return self.llm.get_tokenizer()

    # ---------------------------------------------------------------- sync
    def sync(self, source: WeightSource | torch.nn.Module, step: int, *, verify: bool = False) -> SyncReport:
        """Push the trainer's weights into the engine; READY at `step` on success.

        `source` is a `WeightSource` or a model (wrapped by `source_for`, cast to
        the engine dtype group by group).

        On any failure the engine is left FAILED and `SyncError` is raised with
        the offending parameter's name where there is one.
        """
        if self.state is EngineState.SYNCING:
            raise SyncError("a sync is already in progress")
        if not isinstance(source, WeightSource):
            # cast on the trainer side, one group at a time: the engine loads bf16 anyway
            source = source_for(source, dtype=getattr(torch, self.config.dtype))
        self.state = EngineState.SYNCING
        received: set[str] = set()
        counts = {"bytes": 0, "groups": 0}
        start = time.perf_counter()
        try:
            self.backend.begin()
            # closing(): a failure here closes the source's generator at once, so a
            # distributed source tells the other ranks now, not at garbage collection
            with contextlib.closing(source.groups()) as groups:
                for group in groups:
                    self._check_group(group, received)
                    self.backend.load(group)
                    counts["groups"] += 1
                    counts["bytes"] += sum(t.nbytes for _, t in group)
                    del group
            missing = sorted(set(self.checkpoint_shapes) - received)
            if missing:
                raise SyncError(f"sync incomplete: {len(missing)} checkpoint tensors never arrived, e.g. {missing[:3]}")
            self.backend.commit()
            # KV blocks cached for a prompt prefix were computed with the old weights
            vllm_engine.reset_prefix_cache(self.llm)
        except BaseException as exc:
            self._fail(exc)
            if isinstance(exc, SyncError):
                raise
            raise SyncError(f"sync to step {step} failed: {type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - start
        report = SyncReport(
            step=step,
            backend=self.backend.name,
            seconds=seconds,
            num_bytes=counts["bytes"],
            num_groups=counts["groups"],
            num_tensors=len(received),
            peak_load_bytes=self.backend.peak_live_bytes,
            peak_gathered_bytes=source.stats.peak_bytes,
        )
        if verify:
            try:
                report.num_verified = verify_groups(self.model, self.packed, source.groups(), received)
            except SyncError as exc:
                self.state, self.error = EngineState.FAILED, exc
                raise
            report.verified = True
        self.state, self.step, self.error = EngineState.READY, step, None
        return report

    def _check_group(self, group: Weights, received: set[str]) -> None:
        for name, tensor in group:
            want = self.checkpoint_shapes.get(name)
            if want is None:
                raise SyncError(f"engine has no parameter {name!r} (not in the checkpoint)")
            if tuple(tensor.shape) != want:
                raise SyncError(f"parameter {name!r}: shape {tuple(tensor.shape)} != engine's {want}")
            if name in received:
                raise SyncError(f"parameter {name!r} arrived twice in one sync")
            if self.config.reject_nonfinite and not bool(torch.isfinite(tensor).all()):
                raise SyncError(f"parameter {name!r} has non-finite values (reject_nonfinite=True)")
            received.add(name)

    def _fail(self, exc: BaseException) -> None:
        self.state, self.error = EngineState.FAILED, exc
        try:
            self.backend.abort()
        except Exception as abort_exc:  # the sync's own error is the one to report
            exc.add_note(f"abort after the failed sync also raised: {abort_exc!r}")

    # ---------------------------------------------------------- rollouts
    def _require_ready(self) -> None:
        if self.state is not EngineState.READY:
            raise EngineNotReady(
                f"engine is {self.state.value}; its weights are not from one complete sync"
                + (f" (last error: {self.error})" if self.error else "")
                + ". Run a full sync first."
            )

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        *,
        n: int = 1,
        max_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | Sequence[int] | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[PromptResult]:
        """Sample `n` completions per prompt with the sampled tokens' log-probs.

        `seed`: None (engine RNG), one int for every prompt (prompts then share a
        random stream), or one int per prompt (independent, reproducible streams).
        """
        self._require_ready()
        seeds = list(seed) if isinstance(seed, Sequence) else [seed] * len(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"seed: {len(seeds)} seeds for {len(prompts)} prompts")
        params = [
            vllm_engine.sampling_params(
                n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                seed=s, logprobs=0, stop_token_ids=list(stop_token_ids or []),
            )
            for s in seeds
        ]
        outputs = self.llm.generate(_as_inputs(prompts), params, use_tqdm=False)
        results = []
        for out in outputs:
            completions = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [float(step_lp[tok].logprob) for tok, step_lp in zip(ids, c.logprobs)]
                completions.append(Completion(token_ids=ids, logprobs=lps, text=c.text))
            results.append(PromptResult(prompt_token_ids=list(out.prompt_token_ids), completions=completions))
        return results

    def score(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Log-prob of each token given its prefix (positions 1..L-1), per sequence."""
        self._require_ready()
        params = vllm_engine.sampling_params(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outputs = self.llm.generate(_as_inputs(sequences), params, use_tqdm=False)
        scores = []
        for seq, out in zip(sequences, outputs):
            lps = [float(pos[tok].logprob) for tok, pos in zip(seq[1:], out.prompt_logprobs[1:])]
            scores.append(torch.tensor(lps, dtype=torch.float32))
        return scores

    # ------------------------------------------------------------ memory
    def sleep(self, level: int = 1) -> None:
        """Release memory while the trainer runs (needs `enable_sleep_mode=True`).

        Level 1 offloads the weights to host memory and drops the KV cache;
        level 2 drops both, so the engine refuses to sample until a full sync.
        Wake up with `wake_up(["weights"])`, sync, then `wake_up(["kv_cache"])`.
        """
        vllm_engine.sleep(self.llm, level)
        if level >= 2 and self.state is EngineState.READY:
            self.state = EngineState.DISCARDED

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-acquire memory; wake `["weights"]` before a sync, `["kv_cache"]` after."""
        vllm_engine.wake_up(self.llm, tags)

    def named_kernel_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The engine's parameters as the kernels use them (for tests and verify)."""
        return self.model.named_parameters()


def _as_inputs(prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[Any]:
    return [p if isinstance(p, str) else {"prompt_token_ids": list(p)} for p in prompts]
