"""Where vLLM's log records go while rlsync runs a recipe: handlers rlsync chooses, not vLLM's own.

Why this is needed: vLLM 0.32 logs through the `vllm` logger, and every
`vllm.LLM(...)` applies a `logging.config.dictConfig` (`vllm.logger.
configure_logging_if_needed`, from `LLM.__init__`, `EngineArgs.create_engine_config`
and `LLMEngine.__init__`) that replaces that logger's handlers with one
`StreamHandler` on stdout at INFO (`VLLM_LOGGING_LEVEL`), unless the engine's
`LoggingConfig` says `configure_logging=False`. So handlers set on the `vllm`
logger before an engine is built are thrown away while it is built, and every
INFO line (model loading, "Successfully reset prefix cache" at each sync) lands
on the terminal.

`vllm_logs_to(handlers)` sets the `vllm` logger's handlers for the length of a
`with` block, and every engine built inside the block (`vllm_engine.build_llm`
asks `llm_logging_kwargs()`) gets `LoggingConfig(configure_logging=False)`, so
vLLM keeps them. The environment switch (`VLLM_CONFIGURE_LOGGING=0`) is not used:
vLLM caches its environment after the first engine of a process is built
(`envs.enable_envs_cache`), so a later change would be ignored. Given a file
(`native_output`), the block also sends what an engine build writes to the
process's stderr outside Python's logging to that file (`native_output_to_log`):
the CPU worker's C++ NUMA-binding notice, the `FutureWarning`s vLLM's import
triggers in torch.

`EXPECTED_NOTICES` lists the warnings vLLM 0.32 gives on every run of rlsync's
CPU configs about behaviour rlsync chose or the CPU build implies, each with the
reason; `UnexpectedOnly` is a handler filter that drops them, so a terminal
handler shows vLLM's other warnings. A notice whose wording changes in a later
vLLM is shown again, never silently lost.

What it deliberately does not do: change anything outside the block. A library
user who builds `VLLMEngine` without it gets vLLM's logging exactly as vLLM sets
it up, and an explicit `logging_config` in `EngineConfig.llm_kwargs` wins.

Limitations:
1. Native output after the engine is built (a C++ warning during a sync or a
   rollout) is not redirected; neither is a `print` outside the build.
2. Inside the block, a `VLLM_LOGGING_CONFIG_PATH` file is not applied (the
   block's handlers are the configuration), and vLLM's platform notices that
   it emits only when it configures logging itself are skipped.
3. During the build, everything written to file descriptor 2 goes to the file,
   also from other threads; Python-level writes to a replaced `sys.stderr`
   (pytest's capture) are not affected.
4. One block at a time per process (a nested block restores the outer block's
   settings when it ends, which is what nesting needs; threads are not handled).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

VLLM_LOGGER = "vllm"
"""vLLM's package logger; every vLLM module logs under it (`vllm.init_logger(__name__)`)."""

EXPECTED_NOTICES: tuple[tuple[str, str], ...] = (
    ("The global random seed is set to",
     "rlsync runs the engine in the trainer's process on purpose, and seeds every rollout per step"),
    ("Enforce eager set, disabling torch.compile",
     "engine.enforce_eager=True is rlsync's default: CPU has no graphs, and transformers' classes stay unpatched"),
    ("Inductor compilation was disabled by user settings", "the same setting"),
    ("Triton is installed, but doesn't include CPU backend", "vLLM's CPU build runs without Triton"),
    ("Triton is not installed. triton-cpu is expected", "vLLM's CPU build runs without Triton"),
    ("Model Runner V2 requires Triton", "without Triton vLLM picks its V1 model runner"),
    ("libtcmalloc is not found in LD_PRELOAD", "allocator advice for a vLLM server process"),
    ("libiomp is not found in LD_PRELOAD", "allocator advice for a vLLM server process"),
    ("CPU backend doesn't allow to use `torch.set_num_threads`",
     "vLLM's CPU worker pins the process's threads and turns every later torch.set_num_threads call, the "
     "colocated trainer's libraries' included, into this notice"),
    ("Reset SSM cache type to float32 for accelerated GDN mamba backend",
     "on CPUs with AVX-512 BF16 vLLM's CPU platform sets the state-space-model cache dtype of every engine; "
     "transformer models have no such cache"),
    ("Failed to create oneDNN linear, fallback to torch linear",
     "where oneDNN has no kernel for an unquantized layer's shape and dtype, vLLM uses torch's linear (same "
     "result)"),
)
"""(start of the message, why it is expected): vLLM 0.32 warnings every rlsync CPU run gets."""

_blocks: list[Path | None] = []
"""The open `vllm_logs_to` blocks' `native_output`, innermost last (engines built inside keep their handlers)."""


class UnexpectedOnly(logging.Filter):
    """Drops the records `EXPECTED_NOTICES` lists; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(start) for start, _ in EXPECTED_NOTICES)


@contextlib.contextmanager
def vllm_logs_to(handlers: list[logging.Handler], level: int | str = logging.INFO, *,
                 native_output: Path | None = None) -> Iterator[None]:
    """Within the block, vLLM's records at `level` and up go to `handlers` only (not to the root logger), and
    an engine build's native stderr goes to `native_output` if given.

    On exit the `vllm` logger's handlers, level and propagation are what they were before.
    """
    logger = logging.getLogger(VLLM_LOGGER)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    logger.handlers = list(handlers)
    logger.setLevel(level)
    logger.propagate = False
    _blocks.append(native_output)
    try:
        yield
    finally:
        _blocks.pop()
        logger.handlers, level_before, logger.propagate = saved
        logger.setLevel(level_before)


def llm_logging_kwargs() -> dict[str, Any]:
    """Extra `vllm.LLM` keyword arguments for an engine built now: inside `vllm_logs_to`, keep vLLM from
    replacing the handlers set there; outside, nothing (vLLM configures its logging as it always does)."""
    if not _blocks:
        return {}
    from vllm.config.logging import LoggingConfig

    # no config file either: vLLM refuses one (VLLM_LOGGING_CONFIG_PATH) with configuration disabled
    return {"logging_config": LoggingConfig(configure_logging=False, pylogging_config_file=None)}


@contextlib.contextmanager
def native_output_to_log() -> Iterator[None]:
    """Around an engine build: inside `vllm_logs_to(..., native_output=path)`, file descriptor 2 (stderr) is
    appended to `path` until the build ends (raises or not); elsewhere nothing changes."""
    path = _blocks[-1] if _blocks else None
    if path is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
