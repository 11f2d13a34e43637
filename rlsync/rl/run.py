"""A run directory: the resolved config and a metrics JSONL, one line per step.

Why JSONL: appending a line per step survives a killed run (every finished step
is on disk), and any tool reads it. The resolved config (after overrides) is
written first, so a run directory alone says how it was produced.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import yaml

from rlsync.config import to_dict


@dataclasses.dataclass(kw_only=True, slots=True)
class RunConfig:
    """Where a run writes and how it is seeded."""

    output_dir: str = "runs"
    """Parent directory of run directories."""
    name: str = "grpo-tiny"
    """Run directory name under `output_dir`."""
    seed: int = 0
    """Seed for torch, the task's prompts and the engine's sampling."""


class RunDir:
    """Creates `output_dir/name`, writes `config.yaml`, appends `metrics.jsonl`."""

    def __init__(self, config: RunConfig, resolved: Any, *, append: bool = False) -> None:
        self.path = Path(config.output_dir) / config.name
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        if not append and self.metrics_path.exists():
            self.metrics_path.unlink()
        with (self.path / "config.yaml").open("w") as f:
            yaml.safe_dump(to_dict(resolved), f, sort_keys=False)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, "time": time.time(), **metrics}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All metric records of a run, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]
