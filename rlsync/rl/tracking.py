"""Experiment trackers a run reports to: TensorBoard, Weights & Biases, trackio, named in `run.report_to`.

Why one list: a run's metrics already go to `metrics.jsonl`; a tracker is a
second copy for a dashboard, so choosing trackers is one setting, the same in
every recipe. rlsync's recipes log through `open_trackers`; the trl recipe
hands the same list to trl's own reporters (`trl_reporting`), which trl also
uses for its completion tables.

Names: every metric under `train/` with `train/global_step` as the x-axis, the
convention of the Hugging Face `Trainer` that trl's reporters follow, so a
dashboard shows `train/reward`, `train/sync/seconds`, ... alike for the grpo,
ppo and trl_grpo recipes (the metric names themselves: `docs/runs.md`).
`metrics.jsonl` keeps the bare names.

Each tracker library is imported only when a run names it; `check_report_to`
refuses a name whose library is not installed when the config is loaded.
Where the data goes is each library's own setting: `WANDB_MODE=offline`,
`WANDB_API_KEY` for wandb (its local files go to `<run dir>/wandb`, or
`WANDB_DIR`); `TRACKIO_DIR` (local, the default), `TRACKIO_SPACE_ID` for
trackio; TensorBoard event files go to `<run dir>/tensorboard`. The same
in all three recipes.

Limitations:
1. A resumed run starts a new wandb and trackio run under the same name (the
   steps after the checkpoint are logged again there); TensorBoard drops its
   events after the checkpoint's step instead.
2. Rank 0 reports; the other ranks open no tracker.
3. trackio and wandb print their own lines (where the run is stored, how to
   view or sync it) on the terminal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

from rlsync.errors import ConfigError

TrackerName = Literal["tensorboard", "trackio", "wandb"]
EXTRAS = {"tensorboard": ("tensorboard", "plot"), "trackio": ("trackio", "tracking"), "wandb": ("wandb", "tracking")}
"""Tracker name -> (the package it needs, the rlsync extra that installs it)."""
PREFIX = "train/"
STEP_KEY = "train/global_step"
TENSORBOARD_DIR = "tensorboard"


def check_report_to(names: list[str]) -> None:
    """`ConfigError` naming `run.report_to` for a repeated tracker or one whose library is not installed."""
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"run.report_to: {name!r} is named twice")
        package, extra = EXTRAS[name]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"run.report_to: {name!r} needs the {package} package, which is not installed "
                              f"(pip install 'rlsync[{extra}]', or pip install {package})")


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def close(self) -> None: ...


@dataclasses.dataclass(kw_only=True, slots=True)
class TrackerRun:
    """Who a run is to the trackers."""

    path: Path
    """The run directory."""
    project: str
    """wandb / trackio project."""
    name: str
    """The run's name there (`run.name`)."""
    config: dict[str, Any]
    """The resolved config, stored with the run."""


def open_trackers(names: list[str], run: TrackerRun, *, purge_step: int | None = None) -> list[Tracker]:
    """Start each named tracker; `purge_step` (resume) drops TensorBoard events from that step on."""
    opened: list[Tracker] = []
    try:
        for name in names:
            opened.append(TensorBoard(run, purge_step) if name == "tensorboard" else _OPENERS[name](run))
    except BaseException:
        close_all(opened)
        raise
    return opened


def close_all(trackers: list[Tracker]) -> None:
    """Close every tracker, the others too when one fails (the first failure is raised)."""
    with contextlib.ExitStack() as stack:
        for tracker in trackers:
            stack.callback(tracker.close)


def prefixed(metrics: dict[str, float]) -> dict[str, float]:
    return {PREFIX + key: value for key, value in metrics.items()}


class TensorBoard:
    """Scalars in `<run dir>/tensorboard`."""

    def __init__(self, run: TrackerRun, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.path / TENSORBOARD_DIR), purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in prefixed(metrics).items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """A wandb run (`wandb.init`), online or offline as wandb's own settings say; its local files under
    `WANDB_DIR` if set, else in the run directory (`<run dir>/wandb`)."""

    def __init__(self, run: TrackerRun) -> None:
        import wandb

        local = os.environ.get("WANDB_DIR") or str(run.path)  # read now: wandb reads it once per process
        self.run = wandb.init(project=run.project, name=run.name, config=run.config, dir=local)
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY, step_sync=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({**prefixed(metrics), STEP_KEY: step})

    def close(self) -> None:
        self.run.finish()


class Trackio:
    """A trackio run (`trackio.init`): local under `TRACKIO_DIR` unless trackio is told of a Space or server."""

    def __init__(self, run: TrackerRun) -> None:
        import trackio

        self.trackio = trackio
        trackio.init(project=run.project, name=run.name, config=run.config, embed=False)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.trackio.log({**prefixed(metrics), STEP_KEY: step}, step=step)

    def close(self) -> None:
        self.trackio.finish()


_OPENERS = {"wandb": Wandb, "trackio": Trackio}


@dataclasses.dataclass(kw_only=True, slots=True)
class TrlReporting:
    """What a trl trainer gets for `run.report_to`."""

    args: dict[str, Any]
    """`report_to`, `run_name` and `project` for trl's config."""
    callbacks: list[Any]
    """Reporters set up here (TensorBoard into `<run dir>/tensorboard`)."""


@contextlib.contextmanager
def trl_reporting(names: list[str], run: TrackerRun) -> Iterator[TrlReporting]:
    """`run.report_to` for trl's reporters, which log trl's metrics under the same `train/` names.

    trl gets `report_to` itself, except that TensorBoard is a callback writing
    into `<run dir>/tensorboard` (where the other recipes write; trl's own
    would pick a directory under its output_dir), and a wandb run is started
    here, in `run.project` with the resolved config (trl's reporter then logs
    into it), and finished when the block ends, which trl's reporter does not do.
    """
    callbacks: list[Any] = []
    if "tensorboard" in names:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(str(run.path / TENSORBOARD_DIR))))
    args = {"report_to": [name for name in names if name != "tensorboard"], "run_name": run.name,
            "project": run.project}
    wandb_run = Wandb(run) if "wandb" in names else None
    try:
        yield TrlReporting(args=args, callbacks=callbacks)
    finally:
        if wandb_run is not None:
            wandb_run.close()
