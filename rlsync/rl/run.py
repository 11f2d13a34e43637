"""A run directory: resolved config, metrics JSONL, checkpoints, optional trackers (`run.report_to`).

Why JSONL: appending a line per step survives a killed run (every finished step
is on disk), and any tool reads it. The resolved config (after overrides) is
written first, so a run directory alone says how it was produced.

Resume: `RunDir(..., resume=True)` reopens an existing directory, refuses a
config that differs from the saved one in anything but the keys in
`RESUMABLE_CHANGES` (a resumed run must be the same experiment; a key added
to rlsync after the run started counts as unchanged at its default), and
`truncate_after(step)` drops metric lines past the checkpoint being resumed,
since those steps are about to be recomputed. A fresh start in a directory that
holds checkpoints is refused unless `run.overwrite` is set, so forgetting
`resume=true` never silently discards a long run.

Ownership: every run directory rlsync creates carries a marker file
(`.rlsync-run`). rlsync writes into, resumes from or (with `run.overwrite`)
deletes only a directory with that marker, or an empty one it then marks; any
other existing directory is refused, so a mistyped `run.output_dir` can never
delete someone's `checkpoints/`.

Failure: `RunDir` is a context manager; `with RunDir(...) as run:` closes it
(trackers flushed and closed) also when the run raises. Metric lines are
appended and closed one at a time, so every logged step is on disk.

Limitations:
1. Only rank 0 writes (`writer=False` elsewhere); other ranks get a RunDir that
   knows its path and ignores `log`.
2. Trackers (`rlsync.rl.tracking`) get the same scalars as the JSONL, nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from rlsync.config import to_dict
from rlsync.config.loader import read_yaml
from rlsync.errors import ConfigError
from rlsync.rl import checkpoint
from rlsync.rl.tracking import Tracker, TrackerName, TrackerRun, check_report_to, close_all, open_trackers
from rlsync.trainer import TrainerConfig, setup_distributed, teardown_distributed

# Dotted config keys a resumed run may change: how long it runs and how it
# logs, never what it computes. Keys ending in ".steps" match any recipe section.
RESUMABLE_CHANGES = (
    "resume", ".steps", "run.checkpoint_every", "run.keep_checkpoints", "run.report_to", "run.project",
    "run.tensorboard",  # replaced by run.report_to; a run an older rlsync started may still be resumed
    "run.progress", "run.verbose", "run.overwrite", "run.export", "sync.verify_every",
)


@dataclasses.dataclass(kw_only=True, slots=True)
class RunConfig:
    """Where a run writes, how it is seeded, how often it checkpoints."""

    output_dir: str = "runs"
    """Parent directory of run directories."""
    name: str = "grpo-tiny"
    """Run directory name under `output_dir`."""
    seed: int = 0
    """Seed for torch, the task's prompts and the engine's sampling (a per-step seed derived from it)."""
    checkpoint_every: int = 0
    """Save policy, optimizer, RNG and step every N steps, and after the last step (0 = never)."""
    keep_checkpoints: int = 2
    """Newest complete checkpoints kept (0 = keep all)."""
    overwrite: bool = False
    """Let a fresh (non-resume) run delete its old run directory (only one rlsync created: see `MARKER`)."""
    report_to: list[TrackerName] = dataclasses.field(default_factory=list)
    """Trackers that also get the metrics: `tensorboard` (`<run dir>/tensorboard`), `wandb`, `trackio`."""
    project: str = "rlsync"
    """wandb / trackio project the run reports to (under its `name`)."""
    progress: bool = True
    """Progress bars for training steps and syncs."""
    verbose: bool = False
    """Also print vLLM's log on the terminal (`rlsync run -v`); it always goes to `<run dir>/run.log`."""
    export: bool = False
    """At the end, write the policy as a Hugging Face checkpoint into `<run dir>/export` (`rlsync.rl.export`;
    needs `checkpoint_every` > 0: it is made from the final checkpoint). Off by default: it is one more full copy
    of the weights per run (15 GB for a 7B model in bf16), and `rlsync export RUN_DIR OUT` makes the same from
    any checkpoint of the run, whenever it is wanted."""

    def validate(self) -> None:
        if self.checkpoint_every < 0:
            raise ConfigError(f"run.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.keep_checkpoints < 0:
            raise ConfigError(f"run.keep_checkpoints must be >= 0, got {self.keep_checkpoints}")
        if self.export and self.checkpoint_every == 0:
            raise ConfigError("run.export: the export is made from the run's final checkpoint; set "
                              "run.checkpoint_every > 0 (the last step is always saved), or run.export=false")
        check_name(self.name)
        check_report_to(self.report_to)
        if not self.project.strip():
            raise ConfigError("run.project must not be empty")
        if not self.output_dir or any(ord(ch) < 32 for ch in self.output_dir):
            raise ConfigError(f"run.output_dir must be a path without control characters, got {self.output_dir!r}")


MARKER = ".rlsync-run"
"""File in every run directory rlsync creates; only such a directory is ever resumed, reused or deleted."""
MAX_NAME_BYTES = 255  # a file name's limit on common filesystems


def check_name(name: str) -> None:
    """`ConfigError` naming `run.name` unless it is one plain directory name."""
    problem = None
    if not name:
        problem = "it is empty"
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        problem = "it holds a control character (NUL, newline, ...)"
    elif "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        problem = "it holds a path separator"
    elif ".." in name or name == ".":
        problem = "it holds '..' or is '.'"
    elif len(name.encode()) > MAX_NAME_BYTES:
        problem = f"it is {len(name.encode())} bytes long (at most {MAX_NAME_BYTES})"
    if problem:
        raise ConfigError(f"run.name must be a plain directory name, got {name[:80]!r}: {problem}")


class RunDir:
    """Creates `output_dir/name`, writes `config.yaml`, appends `metrics.jsonl`."""

    def __init__(self, config: RunConfig, resolved: Any, *, resume: bool = False, writer: bool = True) -> None:
        self.config = config
        self.path = Path(config.output_dir) / config.name
        self.metrics_path = self.path / "metrics.jsonl"
        self.writer = writer
        self._trackers: list[Tracker] = []
        if not writer:
            return
        self._claim(resume)
        config_path = self.path / "config.yaml"
        resolved_dict = to_dict(resolved)
        if resume and config_path.exists():
            defaults = to_dict(type(resolved)()) if dataclasses.is_dataclass(resolved) else None
            _check_same_experiment(read_yaml(config_path) or {}, resolved_dict, config_path, defaults)
        elif not resume and self.metrics_path.exists():
            self.metrics_path.unlink()
        with config_path.open("w") as f:
            yaml.safe_dump(resolved_dict, f, sort_keys=False)
        self._resolved = resolved_dict

    def _claim(self, resume: bool) -> None:
        """Create (and mark) the run directory, or check that an existing one is rlsync's to reuse."""
        marker = self.path / MARKER
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_dir()):
            raise ConfigError(f"run.name: {self.path} exists and is not a directory; choose another run.name")
        if self.path.is_dir() and any(self.path.iterdir()) and not marker.is_file():
            key = "run.overwrite" if self.config.overwrite and not resume else "run.name"
            raise ConfigError(
                f"{key}: {self.path} exists and was not created by rlsync (no {MARKER} file in it); rlsync never "
                f"writes into, resumes or deletes such a directory: choose another run.name or run.output_dir "
                f"(for a run of an rlsync without markers, create the empty file {marker} to adopt it)"
            )
        if not resume and self.path.is_dir():
            if self.config.overwrite:
                warnings.warn(f"run.overwrite: deleting the old run directory {self.path}", stacklevel=3)
                shutil.rmtree(self.path)
            elif checkpoint.checkpoint_dir(self.path).exists():
                raise ConfigError(
                    f"run.name: {self.path} already holds checkpoints; pass resume=true to continue that run, "
                    f"run.overwrite=true to start over, or another run.name"
                )
        self.path.mkdir(parents=True, exist_ok=True)
        if not marker.is_file():
            marker.write_text("rlsync run directory: rlsync may resume, overwrite or delete it\n")

    def truncate_after(self, step: int) -> None:
        """Drop metric records of steps after `step` (they are recomputed after a resume)."""
        if not self.writer or not self.metrics_path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        with tmp.open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.metrics_path)

    def open_trackers(self, purge_step: int | None = None) -> None:
        """Start the trackers in `run.report_to`; `purge_step` (resume) drops TensorBoard events from it on."""
        if not self.writer:
            return
        run = TrackerRun(path=self.path, project=self.config.project, name=self.config.name, config=self._resolved)
        self._trackers = open_trackers(self.config.report_to, run, purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.writer:
            return
        record = {"step": step, "time": time.time(), **metrics}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for tracker in self._trackers:
            tracker.log(step, metrics)

    def close(self) -> None:
        trackers, self._trackers = self._trackers, []
        close_all(trackers)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def trainer_group(config: TrainerConfig) -> Iterator[None]:
    """The trainer's process group for one run: joined on entry, left on exit, on failure too.

    On success the ranks meet once more (`teardown_distributed`). On failure
    that barrier is skipped: the failing rank may be the only one that failed
    (a run-directory check on rank 0), and waiting for ranks that sit in another
    collective would hang the job until the group's timeout; leaving instead
    lets the launcher stop the others as soon as this process exits. In both
    cases the group itself ends with the process (see `teardown_distributed`).
    """
    setup_distributed(config)
    yield  # a failure propagates from here and skips the barrier below
    teardown_distributed()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All metric records of a run, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory?")
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _check_same_experiment(saved: dict, resolved: dict, config_path: Path, defaults: dict | None = None) -> None:
    """Refuse a resume whose config differs from the saved one outside `RESUMABLE_CHANGES`.

    A key the saved config lacks (added to rlsync after that run started, e.g.
    `model.builtin`) counts as unchanged while the new config holds its default
    (`defaults`, the recipe config's defaults), which is what the old run ran with.
    """
    saved_flat, new_flat, default_flat = _flatten(saved), _flatten(resolved), _flatten(defaults or {})
    changed = sorted(k for k in saved_flat.keys() | new_flat.keys() if saved_flat.get(k) != new_flat.get(k)
                     and not (k not in saved_flat and k in default_flat and new_flat.get(k) == default_flat[k]))
    blocking = [k for k in changed
                if not any(k == r or (r.startswith(".") and k.endswith(r)) for r in RESUMABLE_CHANGES)]
    if blocking:
        details = ", ".join(f"{k}: {saved_flat.get(k)!r} -> {new_flat.get(k)!r}" for k in blocking[:5])
        raise ConfigError(
            f"resume: the config differs from the run's saved {config_path} in {details}; a resumed run must be "
            f"the same experiment (only {', '.join(RESUMABLE_CHANGES)} may change)"
        )


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): data}
