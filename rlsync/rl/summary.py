"""The block a run prints when it ends: what it learned, what its syncs cost, whether they were proved, where
its files are.

Why from `metrics.jsonl`: the summary states what the run logged, so it agrees
with the plot and with any later reading of the file; nothing is re-measured
or estimated here. The one figure the file cannot hold, the time this command
took (engine build included), is passed in by the caller and labelled as such.

Keys read (the recipes log them every step; a key a run did not log shows as
"not logged"): `reward`; `success`, the fraction of correct answers, for a task
that can tell right from wrong (`SUCCESS_KEY`); `sync/seconds`; `sync/verified`,
`sync/verified_tensors`, `sync/written_tensors` on verified steps; the
trainer / rollout log-prob mismatch (`MISMATCH_KEYS`, first one present);
`time` and `step_seconds`.

Limitations:
1. The wall time from the file spans the first logged step's start to the last
   one's end; for a resumed run it includes the time between the sessions.
2. The plot is listed only once drawn (`rlsync plot RUN_DIR`), the Hugging Face
   export only once written (`run.export`, or `rlsync export` into
   `RUN_DIR/export`); otherwise the summary gives the command.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any

from rlsync.rl import checkpoint
from rlsync.rl.export import EXPORT_DIR, export_info, trl_checkpoints
from rlsync.rl.run import read_metrics

SUCCESS_KEY = "success"
"""Per-step metric a task with right and wrong answers logs: the fraction of completions it judged correct."""
MISMATCH_KEYS = ("logprob_mismatch", "sampling/sampling_logp_difference/mean")
"""Mean |trainer - rollout engine| log-prob per sampled token: rlsync's recipes, then trl's name for it."""
PLOT_FILE = "metrics.png"
LOG_FILE = "run.log"


@dataclasses.dataclass(kw_only=True, slots=True)
class Series:
    """One metric over the steps that logged it."""

    key: str
    steps: list[int]
    values: list[float]

    @classmethod
    def of(cls, records: list[dict[str, Any]], key: str) -> Series | None:
        points = [(r["step"], float(r[key])) for r in records if key in r]
        if not points:
            return None
        return cls(key=key, steps=[s for s, _ in points], values=[v for _, v in points])

    def first_to_final(self, fmt: str = ".3f") -> str:
        return (f"{self.values[0]:{fmt}} (step {self.steps[0]}) -> "
                f"{self.values[-1]:{fmt}} (step {self.steps[-1]})")


@dataclasses.dataclass(kw_only=True, slots=True)
class RunSummary:
    """What `format_summary` prints, read from a run directory."""

    path: Path
    records: list[dict[str, Any]]
    """Every line of `metrics.jsonl`."""
    checkpoints: list[Path]
    """Complete checkpoints, oldest first (rlsync's, or the trl recipe's transformers checkpoints)."""
    session_seconds: float | None = None
    """How long the command that produced this summary ran (not in `metrics.jsonl`); None to leave it out."""
    exported: Path | None = None
    """A Hugging Face export of the policy (`from_run` finds `<run dir>/export`, where `run.export` writes)."""

    @classmethod
    def from_run(cls, run_dir: str | Path, *, session_seconds: float | None = None,
                 exported: Path | None = None) -> RunSummary:
        path = Path(run_dir)
        records = read_metrics(path) if (path / "metrics.jsonl").exists() else []
        if exported is None and export_info(path / EXPORT_DIR) is not None:
            exported = path / EXPORT_DIR
        checkpoints = checkpoint.complete_checkpoints(checkpoint.checkpoint_dir(path)) or trl_checkpoints(path)
        return cls(path=path, records=records, session_seconds=session_seconds, exported=exported,
                   checkpoints=checkpoints)

    def rows(self) -> list[tuple[str, str]]:
        """(label, text) pairs, in the order printed."""
        records = self.records
        if not records:
            rows = [("steps", "none logged")]
        else:
            steps = sorted({r["step"] for r in records})  # trl adds an end-of-training record at the last step
            rows = [("steps", f"{len(steps)} (steps {steps[0]}-{steps[-1]})")]
            for label, key in (("reward", "reward"), ("success", SUCCESS_KEY)):
                series = Series.of(records, key)
                if series is not None:
                    rows.append((label, series.first_to_final()))
                elif key == "reward":
                    rows.append((label, "not logged"))
            rows += [("sync", self._sync()), ("verified", self._verified()), ("mismatch", self._mismatch()),
                     ("wall time", self._wall_time())]
        rows += self._paths()
        return rows

    def _sync(self) -> str:
        series = Series.of(self.records, "sync/seconds")
        if series is None:
            return "not logged"
        worst = max(range(len(series.values)), key=series.values.__getitem__)
        return (f"median {statistics.median(series.values):.4f} s, max {series.values[worst]:.4f} s "
                f"(step {series.steps[worst]}), {len(series.values)} syncs")

    def _verified(self) -> str:
        checked = [r for r in self.records if "sync/verified" in r]
        num_syncs = sum("sync/seconds" in r for r in self.records)
        if not checked:
            return f"none of {num_syncs} syncs was verified"
        passed = [r for r in checked if r["sync/verified"] == 1.0]
        text = f"{len(passed)}/{len(checked)} syncs verified"
        if all("sync/verified_tensors" in r and "sync/written_tensors" in r for r in checked):
            proved = sum(int(r["sync/verified_tensors"]) for r in checked)
            written = sum(int(r["sync/written_tensors"]) for r in checked)
            text += f", {proved}/{written} tensors bit for bit"
        return text + f" ({len(checked)} of {num_syncs} syncs checked)"

    def _mismatch(self) -> str:
        series = next((s for s in (Series.of(self.records, k) for k in MISMATCH_KEYS) if s is not None), None)
        if series is None:
            return "not logged"
        return f"{series.key} {series.first_to_final('.4f')}, max {max(series.values):.4f}"

    def _wall_time(self) -> str:
        first, last = self.records[0], self.records[-1]
        if "time" not in first or "time" not in last:
            text = "not logged"
        else:
            start = first["time"] - first.get("step_seconds", 0.0)
            text = f"{last['time'] - start:.1f} s from step {first['step']}'s start to step {last['step']}'s end"
            in_steps = [r["step_seconds"] for r in self.records if "step_seconds" in r]
            if in_steps:
                text += f" ({sum(in_steps):.1f} s in steps)"
        if self.session_seconds is not None:
            text += f"; this command {self.session_seconds:.1f} s"
        return text

    def _paths(self) -> list[tuple[str, str]]:
        rows = [("metrics", str(self.path / "metrics.jsonl"))]
        plot = self.path / PLOT_FILE
        rows.append(("plot", str(plot) if plot.exists() else f"not drawn yet: rlsync plot {self.path}"))
        if self.checkpoints:
            names = ", ".join(p.name for p in reversed(self.checkpoints[:-1]))
            rows.append(("checkpoints", str(self.checkpoints[-1]) + (f" (and {names})" if names else "")))
        else:
            rows.append(("checkpoints", "none"))
        if self.exported is not None:
            info = export_info(self.exported) or {}
            step = f" (step {info['step']})" if "step" in info else ""
            rows.append(("exported", f"{self.exported}{step}"))
        elif self.checkpoints:
            rows.append(("exported", f"not exported: rlsync export {self.path} {self.path / EXPORT_DIR}"))
        if (self.path / LOG_FILE).exists():
            rows.append(("log", str(self.path / LOG_FILE)))
        return rows


def format_summary(summary: RunSummary) -> str:
    """The summary block: a title line, then one aligned `label  text` line per row."""
    rows = summary.rows()
    width = max(len(label) for label, _ in rows)
    return "\n".join([f"run summary: {summary.path}", *(f"  {label:<{width}}  {text}" for label, text in rows)])
