"""A recipe run's terminal: rlsync's own lines, progress bars and a closing summary; vLLM's log in a file.

Why: a colocated engine logs as if it were a server. vLLM writes an INFO line
at every build step and after every sync ("Successfully reset prefix cache"),
through its own handler on stdout, which also lands inside the progress bars.
For the length of a run, `run_console`:
- gives the package logger `rlsync` (every `rlsync.*` module logs under it) one
  terminal handler, `rlsync: <message>` on stderr (rank 0; other ranks show
  warnings only);
- sends vLLM's whole log (INFO, or `VLLM_LOGGING_LEVEL`) and rlsync's lines to
  `<run dir>/run.log`, appended across resumes, with what the engine build
  writes to stderr outside logging (a C++ notice, import-time `FutureWarning`s);
  on the terminal, vLLM's warnings and errors except the notices every CPU run
  gets (`vllm_logs.EXPECTED_NOTICES`, each with its reason), or everything with
  `run.verbose` (`rlsync run -v`). `rlsync.adapters.vllm_logs` keeps vLLM from
  reinstalling its own handler when the engine is built;
- writes every terminal log line through `tqdm.write`, so it lands above the
  progress bars instead of inside one. (`tqdm.contrib.logging.
  logging_redirect_tqdm` does the same by swapping handlers, but drops their
  levels, which would let vLLM's INFO lines back onto the terminal);
- on success, logs the run's summary (`rlsync.rl.summary`) on rank 0.
On exit every logger is left as it was, so a library user's logging setup
outside a run is untouched, and building `VLLMEngine` directly keeps vLLM's
own logging.

Limitations:
1. Output that bypasses `logging` after the engine is built (a library's
   `print`, native code writing to stderr, Python `warnings`) is not redirected.
2. Ranks other than 0 write no log file (only rank 0 writes into the run
   directory); they keep warnings and errors on the terminal.
3. While a run is open, the `rlsync` logger does not propagate to the root
   logger (a root handler would print each line twice).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator

from tqdm import tqdm

from rlsync.adapters.vllm_logs import UnexpectedOnly, vllm_logs_to
from rlsync.rl.run import RunConfig, RunDir
from rlsync.rl.summary import LOG_FILE, RunSummary, format_summary

LOGGER = "rlsync"
"""The package logger; `logging.getLogger(__name__)` in any rlsync module is a child of it."""
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(filename)s:%(lineno)d] %(message)s"
VLLM_TERMINAL_FORMAT = "vllm (pid %(process)d) %(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s"
DATE_FORMAT = "%m-%d %H:%M:%S"

log = logging.getLogger(__name__)


class TerminalHandler(logging.StreamHandler):
    """A stream handler that prints through `tqdm.write`: open progress bars are cleared, the line is written,
    the bars are redrawn below it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:  # logging's contract: a failing handler reports through handleError, never raises
            self.handleError(record)


class RlsyncFormatter(logging.Formatter):
    """`rlsync: <message>`; `rlsync: warning: <message>` (error, ...) from WARNING up."""

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"rlsync: {level}{super().format(record)}"


@contextlib.contextmanager
def run_console(run: RunDir, config: RunConfig) -> Iterator[None]:
    """For the length of a recipe run: rlsync's lines and vLLM's unexpected warnings on the terminal, vLLM's
    whole log in `<run dir>/run.log` (on the terminal too with `config.verbose`), the run's summary at the end."""
    started = time.perf_counter()
    files: list[logging.Handler] = []
    if run.writer:
        log_file = logging.FileHandler(run.path / LOG_FILE, encoding="utf-8")
        log_file.setFormatter(logging.Formatter(FILE_FORMAT))
        files.append(log_file)
    terminal = TerminalHandler(sys.stderr)
    terminal.setFormatter(RlsyncFormatter())
    terminal.setLevel(logging.INFO if run.writer else logging.WARNING)
    vllm_terminal = TerminalHandler(sys.stdout)
    vllm_terminal.setFormatter(logging.Formatter(VLLM_TERMINAL_FORMAT, DATE_FORMAT))
    if not config.verbose:
        vllm_terminal.setLevel(logging.WARNING)
        vllm_terminal.addFilter(UnexpectedOnly())
    vllm_level = os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper()  # vLLM's own default and switch
    native_output = run.path / LOG_FILE if run.writer and not config.verbose else None
    try:
        with (_rlsync_logs_to([terminal, *files]),
              vllm_logs_to([*files, vllm_terminal], vllm_level, native_output=native_output)):
            yield
            if run.writer:
                summary = RunSummary.from_run(run.path, session_seconds=time.perf_counter() - started)
                log.info(format_summary(summary))
    finally:
        for handler in files:
            handler.close()


@contextlib.contextmanager
def command_console() -> Iterator[None]:
    """For a command that builds no engine (`rlsync export`): rlsync's lines, `rlsync: <message>`, on stderr."""
    terminal = TerminalHandler(sys.stderr)
    terminal.setFormatter(RlsyncFormatter())
    with _rlsync_logs_to([terminal]):
        yield


@contextlib.contextmanager
def _rlsync_logs_to(handlers: list[logging.Handler]) -> Iterator[None]:
    logger = logging.getLogger(LOGGER)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    logger.handlers, logger.propagate = list(handlers), False
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.handlers, level, logger.propagate = saved
        logger.setLevel(level)
