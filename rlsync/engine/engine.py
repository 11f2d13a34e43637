"""`VLLMEngine`: a vLLM engine in the trainer's process that refuses stale weights.

Why a wrapper: a rollout must come from exactly one trainer step's weights. The
engine keeps a state machine (READY at step s / SYNCING / FAILED); a sync that
raises for any reason leaves it FAILED, and `generate` then raises
`EngineNotReady` instead of sampling from a half-updated model. The next full
sync brings it back to READY.

A sync validates each incoming tensor (known name, right shape, a floating
dtype, not yet seen, finite unless `reject_nonfinite=False`) before handing
the group to the reload backend, and on commit checks that every checkpoint
tensor arrived exactly once. FP8 layers are checked for non-finite values
through their scales after the load (free); other tensors with one pass.

Concurrency: `sync`, `generate`, `score`, `sleep` and `wake_up` hold one
re-entrant lock, so a sync never overlaps a generation; a second caller waits
for the call in flight (no timeout).

After a failed sync every KV-cache block is zeroed (a NaN in a freed block
survives attention masking), so nothing computed from bad weights outlives the
recovery sync.

Tensor parallelism (`tensor_parallel_size` k > 1): every rank of the group
syncs from the same stream of full tensors and loads its shard; after each sync
the group agrees (`rlsync.engine.parallel.group_failures`), so a failure on any
rank leaves every rank FAILED. Verify runs per rank, on its own shard.

What it does not do: launch processes (use torchrun / deepspeed) or own the
trainer model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from rlsync.adapters import vllm_engine, vllm_layers, vllm_load, vllm_logs, vllm_tp
from rlsync.engine import parallel
from rlsync.engine.checkpoint import checkpoint_shapes
from rlsync.engine.config import EngineConfig
from rlsync.engine.report import SyncReport
from rlsync.engine.verify import verify_groups, weight_sources
from rlsync.errors import ConfigError, EngineNotReady, NonFiniteError, SyncError
from rlsync.quant.finite import is_finite
from rlsync.quant.layout import stacked_view
from rlsync.reload import ReloadBackend, Weights, capture, get_capture, make_backend
from rlsync.source import Stack, WeightSource, segments, source_for


ACCEPTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
"""Dtypes a sync accepts (cast to the engine dtype on load); anything else is refused by name."""


def _first_nonfinite(items: list[tuple[str, torch.Tensor]]) -> str | None:
    """The first name whose tensor holds NaN or Inf, else None; evenly spaced views of one storage with one
    shape (an MoE layer's experts) are checked as one tensor, one reduction for hundreds of tensors."""
    parts: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for name, t in items:
        key = (t.untyped_storage().data_ptr(), t.device, t.dtype, tuple(t.shape), t.stride()) if t.numel() else (name,)
        parts.setdefault(key, []).append((name, t))
    bad: set[str] = set()
    for part in parts.values():
        whole = stacked_view([t for _, t in part]) if len(part) > 1 else None
        if whole is None or not is_finite(whole):
            bad.update(name for name, t in part if not is_finite(t))
    return next((name for name, _ in items if name in bad), None)


def group_nbytes(group: Weights) -> int:
    """Bytes of a group's tensors (a stack's slices counted once, as its tensor)."""
    return sum(sum(t.nbytes for _, t in pairs) if stack is None else stack.tensor.numel() * stack.tensor.element_size()
               for pairs, stack in segments(group))


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
        parallel.check_launch(cfg.tensor_parallel_size, cfg.model)
        # Capture the load format as vLLM builds the model, whichever backend runs
        # now: the rlsync backend needs it and a caller may switch backends later.
        # (inside a recipe run, what the build writes to stderr outside logging goes to the run's log)
        with vllm_logs.native_output_to_log(), vllm_load.capture_at_load(capture):
            self.llm = vllm_engine.build_llm(cfg.model, **llm_kwargs)
        self.model = vllm_engine.driver_model(self.llm)
        self.tp_rank, self.tp_size = vllm_tp.engine_tp(self.model) if cfg.tensor_parallel_size > 1 else (0, 1)
        """This rank's place in its engine's tensor-parallel group (0, 1 without one)."""
        self._tp_group = vllm_tp.tp_cpu_group() if self.tp_size > 1 else None
        get_capture(self.model)  # fails loudly if vLLM stopped calling the capture hook
        self.packed = vllm_engine.packed_modules_mapping(self.model)
        self.checkpoint_shapes = checkpoint_shapes(cfg.model)
        self.backend: ReloadBackend = make_backend(cfg.reload_backend, self.model, vllm_engine.model_config(self.llm),
                                                    plan=cfg.sync_plan)
        self._scales: dict[str, tuple[torch.nn.Module, str]] = {}
        """FP8 layers' scales (linears' `weight_scale`, experts' `w13_weight_scale` / `w2_weight_scale`),
        checked for finiteness after each sync (`_check_scales`)."""
        self._scale_checked: set[str] = set()
        """Checkpoint names whose finiteness the FP8 scales prove (no separate pass over them)."""
        self._stack_shapes: dict[tuple[str, ...], tuple[int, ...]] = {}
        """A stack's names -> the one checkpoint shape they all have (`_check_stack`)."""
        for name, module in self.model.named_modules():
            scales = {p: t for p, t in module._parameters.items() if p.endswith("weight_scale") and t is not None}
            if not scales:
                continue
            self._scales.update({f"{name}.{p}": (module, p) for p in scales})
            if vllm_layers.is_routed_experts(module):
                experts = vllm_layers.expert_checkpoint_names(module)
                self._scale_checked.update(n for p in scales for names in experts[p.removesuffix("_scale")] for n in names)
            else:
                self._scale_checked.update(weight_sources(name, self.packed))
        self._lock = threading.RLock()
        """Serializes sync / generate / score / sleep / wake_up: a caller waits for the one in flight."""
        self._kv_asleep = False
        self._kv_dirty = False
        self._kv_suspect = False
        """The weights in use were loaded without the NaN / Inf check: the next sync zeroes the KV cache."""
        self._check_seconds = 0.0
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
        the engine dtype group by group). Waits for any other engine call
        (`generate`, `score`, another `sync`, ...) to finish first.

        Whatever is raised during the sync or its verify pass, the engine is left
        FAILED (never SYNCING) and every KV-cache block is dropped; the next
        complete sync recovers it. Errors are raised as `SyncError` naming the
        offending parameter where there is one; interrupts (`KeyboardInterrupt`,
        `SystemExit`, any non-`Exception`) propagate as themselves.
        """
        with self._lock:
            if self._tp_group is None:
                return self._sync(source, step, verify)
            return self._sync_in_group(source, step, verify)

    def _sync_in_group(self, source: WeightSource | torch.nn.Module, step: int, verify: bool) -> SyncReport:
        """`_sync` on every rank of a TP group, then one verdict for the group: if any rank failed, all end FAILED."""
        try:
            report = self._sync(source, step, verify)
        except Exception as exc:
            parallel.group_failures(self._tp_group, exc)
            raise  # this rank is FAILED already; the others learn it from the gather
        failures = parallel.group_failures(self._tp_group, None)
        if failures:
            exc = SyncError(f"sync to step {step} failed on another rank of this engine's tensor-parallel group, so "
                            f"this rank's shard is not used either: {'; '.join(failures)}")
            self._fail(exc, abort=False)
            raise exc
        return report

    def _sync(self, source: WeightSource | torch.nn.Module, step: int, verify: bool) -> SyncReport:
        if self.state is EngineState.SYNCING:
            raise SyncError("a sync is already in progress")
        if not isinstance(source, WeightSource):
            # cast on the trainer side, one group at a time: the engine loads bf16 anyway
            source = source_for(source, dtype=getattr(torch, self.config.dtype))
        self.state = EngineState.SYNCING
        received: set[str] = set()
        counts = {"bytes": 0, "groups": 0}
        committed = False
        self._check_seconds = 0.0
        start = time.perf_counter()
        try:
            self.backend.begin()
            # closing(): a failure here closes the source's generator at once, so a
            # distributed source tells the other ranks now, not at garbage collection
            with contextlib.closing(source.groups()) as groups:
                for group in groups:
                    unchecked = self._check_group(group, received)
                    # tensors the backend writes with one plain copy are checked by that copy (one pass, not two)
                    by_copy = self.backend.copy_checked(group, {n for n, _ in unchecked}) if unchecked else set()
                    self._refuse_nonfinite([(n, t) for n, t in unchecked if n not in by_copy])
                    self.backend.load(group, check=by_copy)
                    counts["groups"] += 1
                    counts["bytes"] += group_nbytes(group)
                    del group
            missing = sorted(set(self.checkpoint_shapes) - received)
            if missing:
                raise SyncError(f"sync incomplete: {len(missing)} checkpoint tensors never arrived, e.g. {missing[:3]}")
            self.backend.commit()
            committed = True
            self._check_scales()
            if self._kv_suspect:
                self._clear_kv_cache()  # the old weights were never checked for NaN / Inf: their KV may be poisoned
            else:
                vllm_engine.reset_prefix_cache(self.llm)  # cached prefixes came from the old weights
            self._kv_suspect = not self.config.reject_nonfinite
            report = SyncReport(
                step=step,
                backend=self.backend.name,
                seconds=time.perf_counter() - start,
                num_bytes=counts["bytes"],
                num_groups=counts["groups"],
                num_tensors=len(received),
                peak_load_bytes=self.backend.peak_live_bytes,
                peak_gathered_bytes=source.stats.peak_bytes,
                nonfinite_check_seconds=self._check_seconds,
                planned=self.backend.planned,
                plan_note=self.backend.plan_note,
            )
            if verify:
                report.num_verified, report.num_written = verify_groups(self.model, self.packed, source.groups(), received)
                report.verified = True
        except BaseException as exc:
            self._fail(exc, abort=not committed)
            if isinstance(exc, SyncError) or not isinstance(exc, Exception):
                raise  # interrupts propagate as themselves, after the state is FAILED
            raise SyncError(f"sync to step {step} failed: {type(exc).__name__}: {exc}") from exc
        self.state, self.step, self.error = EngineState.READY, step, None
        return report

    def _check_group(self, group: Weights, received: set[str]) -> list[tuple[str, torch.Tensor]]:
        """Names, shapes, dtypes and arrivals checked; returns the tensors still to check for NaN / Inf.
        A stack of slices (`rlsync.source.StackedGroup`) is checked once for all of them."""
        unchecked: list[tuple[str, torch.Tensor]] = []
        for pairs, stack in segments(group):
            if stack is None or not self._check_stack(stack, received):
                unchecked += self._check_items(pairs, received)
            elif self.config.reject_nonfinite and not self._scale_checked.issuperset(stack.names):
                unchecked += [(n, t) for n, t in pairs if n not in self._scale_checked]
        return unchecked

    def _check_stack(self, stack: Stack, received: set[str]) -> bool:
        """`_check_items` for all of a stack's slices at once; False when their expected shapes differ (then
        they are checked one by one)."""
        want = self._stack_shapes.get(stack.names)
        if want is None:
            shapes = {self.checkpoint_shapes.get(n) for n in stack.names}
            if len(shapes) != 1 or None in shapes or len(set(stack.names)) != len(stack.names):
                return False
            want = self._stack_shapes[stack.names] = shapes.pop()
        tensor = stack.tensor
        if tuple(tensor.shape[1:]) != want or tensor.dtype not in ACCEPTED_DTYPES or not received.isdisjoint(stack.names):
            return False  # one by one, for the error that names the first offending tensor
        received.update(stack.names)
        return True

    def _check_items(self, group: Weights, received: set[str]) -> list[tuple[str, torch.Tensor]]:
        unchecked: list[tuple[str, torch.Tensor]] = []
        for name, tensor in group:
            want = self.checkpoint_shapes.get(name)
            if want is None:
                raise SyncError(f"engine has no parameter {name!r} (not in the checkpoint)")
            if tuple(tensor.shape) != want:
                raise SyncError(f"parameter {name!r}: shape {tuple(tensor.shape)} != engine's {want}")
            if tensor.dtype not in ACCEPTED_DTYPES:
                raise SyncError(f"parameter {name!r}: dtype {tensor.dtype} is not a floating type the engine accepts "
                                f"({', '.join(str(d) for d in ACCEPTED_DTYPES)})")
            if name in received:
                raise SyncError(f"parameter {name!r} arrived twice in one sync")
            if self.config.reject_nonfinite and name not in self._scale_checked:
                unchecked.append((name, tensor))
            received.add(name)
        return unchecked

    def _refuse_nonfinite(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        t0 = time.perf_counter()
        bad = _first_nonfinite(tensors)
        self._check_seconds += time.perf_counter() - t0
        if bad is not None:
            raise NonFiniteError(bad)

    def _timed_finite(self, tensor: torch.Tensor) -> bool:
        t0 = time.perf_counter()
        ok = is_finite(tensor)
        self._check_seconds += time.perf_counter() - t0
        return ok

    def _check_scales(self) -> None:
        """Non-finite check for FP8 layers, at ~no cost: a NaN or Inf anywhere in a weight makes the
        quantizer's absolute max, hence its scale, non-finite (per tensor, channel or block alike)."""
        if not self.config.reject_nonfinite or not self._scales:
            return
        scales = [(name, getattr(module, p)) for name, (module, p) in self._scales.items()]
        t0 = time.perf_counter()  # all scales in one pass (hundreds of small tensors); each one only on failure
        ok = is_finite(torch.cat([s.detach().reshape(-1).float() for _, s in scales]))
        self._check_seconds += time.perf_counter() - t0
        bad = [] if ok else [name for name, s in scales if not self._timed_finite(s)]
        if bad:
            raise SyncError(f"non-finite values (NaN or Inf) arrived for {', '.join(bad[:3])}: their FP8 scales are not "
                            "finite (reject_nonfinite=True)")

    def _clear_kv_cache(self) -> None:
        """Zero every KV block now, or on `wake_up(["kv_cache"])` while the cache sleeps (its memory is released)."""
        if self._kv_asleep:
            self._kv_dirty = True
        else:
            vllm_engine.clear_kv_cache(self.llm)
            self._kv_dirty = False

    def _fail(self, exc: BaseException, *, abort: bool) -> None:
        """FAILED, kernel tensors back on their layers, every KV block dropped; never raises over `exc`."""
        self.state, self.error = EngineState.FAILED, exc
        steps = ([("abort", self.backend.abort)] if abort else []) + [("KV-cache clear", self._clear_kv_cache)]
        for what, action in steps:
            try:
                action()
            except Exception as cleanup_exc:  # the sync's own error is the one to report
                exc.add_note(f"{what} after the failed sync also raised: {cleanup_exc!r}")

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
        with self._lock:
            self._require_ready()
            return self._generate(prompts, n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                  seed=seed, stop_token_ids=stop_token_ids)

    def _generate(self, prompts, *, n, max_tokens, temperature, top_p, seed, stop_token_ids) -> list[PromptResult]:
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
        with self._lock:
            self._require_ready()
            return self._score(sequences)

    def _score(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
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
        with self._lock:
            self._sleep(level)

    def _sleep(self, level: int) -> None:
        vllm_engine.sleep(self.llm, level)
        self._kv_asleep = True
        if level >= 2 and self.state is EngineState.READY:
            self.state = EngineState.DISCARDED

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-acquire memory; wake `["weights"]` before a sync, `["kv_cache"]` after."""
        with self._lock:
            vllm_engine.wake_up(self.llm, tags)
            if tags is None or "kv_cache" in tags:
                self._kv_asleep = False
                if self._kv_dirty:
                    self._clear_kv_cache()

    def gather_in_group(self, obj: Any) -> list[Any]:
        """`obj` from every rank of this engine's tensor-parallel group, in TP-rank order (`[obj]` at TP 1).

        vLLM's `external_launcher` needs every rank of a group to submit the same requests; a rollout gathers the
        group's prompts with this, generates them all on every rank, and keeps its own (`rlsync.rl.rollout`)."""
        return parallel.group_gather(self._tp_group, obj)

    def named_kernel_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The engine's parameters as the kernels use them (for tests and verify)."""
        return self.model.named_parameters()


def _as_inputs(prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[Any]:
    return [p if isinstance(p, str) else {"prompt_token_ids": list(p)} for p in prompts]
