"""vLLM's engine in this process: version check, build, reach the model, sample, sleep.

rlsync runs vLLM in the trainer's process (colocated). Reaching the model object
(`llm.llm_engine.model_executor.driver_worker.model_runner.model`) is an
internal that moves between vLLM releases, so it lives here, guarded by
`SUPPORTED_VLLM` (the one version check every `rlsync.adapters.vllm_*` module
goes through). Public vLLM API (`vllm.LLM`, `SamplingParams`) is reached
through here too, so no other rlsync package imports vLLM at all.

Colocation also means vLLM must not change classes the trainer uses: a build
keeps vLLM's Transformers modeling backend from patching transformers' model
classes in place (`transformers_classes_untouched`; OLMo 2 and every other
architecture vLLM runs through that backend).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from rlsync.adapters.vllm_logs import llm_logging_kwargs
from rlsync.errors import ConfigError

SUPPORTED_VLLM = ("0.32",)
"""vLLM release lines whose internals this adapter was written against."""


def check_vllm_version(version: str) -> None:
    """`RuntimeError` unless `version` is a vLLM release line these adapters were written against."""
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"rlsync's vLLM adapter supports vLLM {', '.join(v + '.x' for v in SUPPORTED_VLLM)}; found {version}"
        )


def import_vllm():
    """Import vLLM for in-process (colocated) use, with rlsync's defaults.

    `VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps the engine core in this process so
    the model object is reachable; a 1 GiB CPU KV cache keeps tests small. Both
    only apply where the user has not set them.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm

    check_vllm_version(vllm.__version__)
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
        raise RuntimeError("colocated sync needs VLLM_ENABLE_V1_MULTIPROCESSING=0 (engine in this process)")
    return vllm


def build_llm(model_path: str, **llm_kwargs: Any):
    """`vllm.LLM(model_path, **llm_kwargs)` in this process, leaving transformers' classes untouched
    (`transformers_classes_untouched`), so a colocated trainer of the same architecture keeps working.
    Inside `vllm_logs.vllm_logs_to`, vLLM keeps the log handlers set there."""
    vllm = import_vllm()
    _keep_trainer_process_group()
    _expert_group_for_a_later_engine()
    with transformers_classes_untouched():
        return vllm.LLM(model_path, **{**llm_logging_kwargs(), **llm_kwargs})


_TRAINER_GROUPS: set[int] = set()
"""Ids of default process groups that existed before an engine was built (the trainer's, not vLLM's)."""


def _keep_trainer_process_group() -> None:
    """Make vLLM's engine teardown leave the trainer's torch.distributed default group alone (idempotent).

    Why: an in-process vLLM engine's shutdown (`EngineCore.shutdown` ->
    `cleanup_dist_env_and_memory`) ends with `torch.distributed.destroy_process_group()`.
    A colocated engine under a launcher shares that default group with the trainer (vLLM's
    `external_launcher` builds its groups from it), so dropping the engine would tear down
    the trainer's collectives mid-run, and no later engine could be built under the same
    launcher. A default group that existed before the build is the trainer's and is kept;
    one vLLM created itself (a one-process engine) is still destroyed with vLLM's own groups.
    """
    import torch.distributed as dist
    from vllm.distributed import parallel_state as ps

    if dist.is_available() and dist.is_initialized():
        _TRAINER_GROUPS.add(id(dist.distributed_c10d._get_default_group()))
    if getattr(ps.destroy_distributed_environment, "rlsync_keeps_default_group", False):
        return

    def destroy_distributed_environment() -> None:
        if ps._WORLD:
            ps._WORLD.destroy()
        ps._WORLD = None
        ps._NODE_COUNT = None
        if dist.is_initialized() and id(dist.distributed_c10d._get_default_group()) not in _TRAINER_GROUPS:
            dist.destroy_process_group()  # vLLM created it

    destroy_distributed_environment.rlsync_keeps_default_group = True
    ps.destroy_distributed_environment = destroy_distributed_environment


def _expert_group_for_a_later_engine() -> None:
    """Give vLLM's process-global parallel state the expert-parallel group an MoE engine needs.

    Why: vLLM sets up its parallel groups once per process, when the first engine
    is built, and creates the expert-parallel (EP) group only if that model is
    MoE. An MoE engine built while an earlier dense engine's groups are still up
    (that engine alive, or not yet collected) then fails deep in the model's
    constructor ("expert parallel group is not initialized"). With no data,
    pipeline or context parallelism, vLLM's EP groups are exactly its tensor
    parallel groups, so that is what is created here (collectively, like vLLM:
    every rank builds its engine). Other layouts are left to vLLM.
    """
    import torch.distributed as dist
    from vllm.distributed import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps._EP is not None:
        return
    if any(group.world_size != 1 for group in (ps.get_dp_group(), ps.get_pp_group(), ps.get_pcp_group())):
        return
    world = ps.get_world_group()
    size, num_ranks = ps.get_tp_group().world_size, world.world_size
    groups = [list(range(start, start + size)) for start in range(0, num_ranks, size)]
    ps._EP = ps.init_model_parallel_group(groups, world.local_rank, dist.get_backend(world.device_group), group_name="ep")


@contextlib.contextmanager
def transformers_classes_untouched() -> Iterator[None]:
    """While vLLM builds a model, keep its Transformers modeling backend from patching transformers' classes.

    Why: architectures vLLM does not implement natively (OLMo 2, GPT-NeoX, Starcoder 2, ...) run on its
    Transformers backend, which marks the decoder class (e.g. transformers' `Olmo2Model`) for torch.compile by
    patching that class in place, process-wide (`support_torch_compile`: a new base, `__init__` and
    `__call__`). A colocated trainer uses the same class: one built after the engine fails in `__init__`
    ("Current vLLM config is not set"), one built before fails in its forward (no `do_not_compile`).

    Where vLLM will not compile the model (compilation mode NONE, as `enforce_eager=True` sets, or stock
    torch.compile of the whole model, or a model the backend itself keeps uncompiled) the patch does nothing
    but mark the instance "do not compile", and the instance then runs its plain forward; so the patch is
    skipped and the instance runs that same forward. Where vLLM would compile the decoder, nothing clean
    can keep the class shared, and the build is refused with `ConfigError` naming the way out.
    """
    from vllm.config import CompilationMode
    from vllm.model_executor.models.transformers.base import Base

    original = Base._decorate_cls_for_torch_compile

    def decorate(self, cls, dynamic_arg_dims, enable_if, is_encoder):
        mode = self.vllm_config.compilation_config.mode
        if mode in (CompilationMode.NONE, CompilationMode.STOCK_TORCH_COMPILE) or not enable_if(self.vllm_config):
            return
        raise ConfigError(
            f"engine: {cls.__module__}.{cls.__name__} runs on vLLM's Transformers modeling backend, whose "
            f"torch.compile support (compilation mode {mode.name}) patches that transformers class in place for "
            "the whole process, so a colocated trainer model of the same class could no longer be built or run. "
            "Set engine.enforce_eager=True (the default): the class is then left untouched."
        )

    Base._decorate_cls_for_torch_compile = decorate
    try:
        yield
    finally:
        Base._decorate_cls_for_torch_compile = original


def model_runner(llm):
    return llm.llm_engine.model_executor.driver_worker.model_runner


def driver_model(llm) -> torch.nn.Module:
    """The `nn.Module` vLLM executes (rank-local, in this process)."""
    return model_runner(llm).model


def model_config(llm):
    return model_runner(llm).vllm_config.model_config


def packed_modules_mapping(model: torch.nn.Module) -> dict[str, list[str]]:
    """Fused engine module -> checkpoint modules, e.g. `qkv_proj -> [q_proj, k_proj, v_proj]`."""
    return dict(getattr(model, "packed_modules_mapping", {}) or {})


def load_weights(model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """vLLM's own name mapping and weight loaders (HF names -> fused params)."""
    return set(model.load_weights(iter(weights)) or ())


def native_reload_weights(llm, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """vLLM's own in-place reload from an iterator: `initialize_layerwise_reload`,
    `model.load_weights`, `finalize_layerwise_reload` in one model-runner call.

    rlsync does not sync this way (no validation, no tied-head refresh); the
    benchmarks use it as the baseline vLLM users have today.
    """
    model_runner(llm).reload_weights(weights_iterator=weights)


def reset_prefix_cache(llm) -> None:
    """Drop cached prefix KV blocks (computed with weights that just changed)."""
    llm.reset_prefix_cache()


def sleep(llm, level: int) -> None:
    llm.sleep(level=level)


def wake_up(llm, tags: list[str] | None = None) -> None:
    llm.wake_up(tags=tags)


def sampling_params(**kwargs: Any):
    """`vllm.SamplingParams(**kwargs)` (public API, imported here so no other package imports vLLM)."""
    return import_vllm().SamplingParams(**kwargs)


def clear_kv_cache(llm) -> int:
    """Drop every cached prefix block and zero all KV-cache memory; the bytes zeroed.

    After weights that were wrong (a failed sync, non-finite values let through),
    freed KV blocks still hold values computed from them. Attention over a
    block's unused slots is masked, but a NaN there survives the mask (NaN + -inf
    is NaN), so stale blocks can poison later rollouts. vLLM 0.32 keeps the
    cache tensors in `model_runner.kv_caches` (tensors, or lists of tensors).
    """
    llm.reset_prefix_cache()
    total = 0
    pending = list(model_runner(llm).kv_caches)
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            item.zero_()
            total += item.nbytes
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return total
