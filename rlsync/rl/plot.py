"""`rlsync plot RUN_DIR`: one PNG of a run's curves, the same panels for every recipe.

Why these panels: reward (and `success`, where the task tells right from
wrong) says whether the run learns; the trainer/engine log-prob mismatch (and
the KL to the reference, when the run keeps one) says whether FP8 rollouts
drift from the policy being trained; sync seconds say what the colocated weight
sync costs each step, with the syncs proved bit for bit marked; a PPO run adds
its value head's fit.

The sync panel has a log scale (its title says so): the first sync of
rlsync's FP8 plugin compiles (about 1 s against 0.01 s for the tiny model on
CPU), and on a linear axis that one point flattens every other. A log axis
keeps the spike and the steady state both readable without dropping a
measurement.

Keys (the names in `docs/runs.md`): the mismatch is the first of
`MISMATCH_KEYS` a run logged (rlsync's `logprob_mismatch`; in a trl run
written before rlsync logged that name there, trl's
`sampling/sampling_logp_difference/mean`).

Uses matplotlib's Agg backend (no display needed), imported only here.

Limitations:
1. Reads `metrics.jsonl` only; a run that logged nothing yet has nothing to plot
   (`ValueError`).
2. Steps that logged a key draw it; a key logged only every N steps (the
   verified syncs) shows as markers, not a line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rlsync.rl.run import read_metrics
from rlsync.rl.summary import MISMATCH_KEYS, PLOT_FILE, SUCCESS_KEY, Series

SYNC_KEY = "sync/seconds"
VERIFIED_KEY = "sync/verified"
VALUE_KEYS = ("value_loss", "value_error", "explained_variance")
"""What `rlsync.rl.ppo` logs about its value head: the clipped value loss, the critic's squared error relative to
the returns' (1 = the zero critic), and the share of the returns' variance it explains."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Panel:
    """One axes of the figure."""

    title: str
    keys: tuple[str, ...]
    """Metrics drawn as lines, each one the run logged."""
    first_of: tuple[str, ...] = ()
    """Names of one quantity: the first the run logged is drawn too."""
    log_scale: bool = False
    only_if_logged: bool = False
    """Left out of the figure for a run that logged none of its keys (a panel for one recipe)."""

    def series(self, records: list[dict[str, Any]]) -> list[Series]:
        found = [s for s in (Series.of(records, key) for key in self.keys) if s is not None]
        first = next((s for s in (Series.of(records, key) for key in self.first_of) if s is not None), None)
        return found + ([first] if first is not None else [])


PANELS = (
    Panel(title="reward", keys=("reward", SUCCESS_KEY)),
    Panel(title="KL / mismatch", keys=("kl",), first_of=MISMATCH_KEYS),
    Panel(title="sync seconds (log scale)", keys=(SYNC_KEY,), log_scale=True),
    Panel(title="value head (PPO)", keys=VALUE_KEYS, only_if_logged=True),
)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's curves to `out` (default `<run dir>/metrics.png`); returns the path."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no records yet")
    out = Path(out) if out is not None else run_dir / PLOT_FILE
    fig = figure(records, title=run_dir.name)
    import matplotlib.pyplot as plt

    try:
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    return out


def figure(records: list[dict[str, Any]], *, title: str):
    """The run's panels as a matplotlib `Figure` (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in PANELS if not p.only_if_logged or p.series(records)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        for series in panel.series(records):
            ax.plot(series.steps, series.values, marker=".", label=series.key)
        if panel.log_scale and ax.lines:
            ax.set_yscale("log")
        if SYNC_KEY in panel.keys:
            _mark_verified(ax, records)
        ax.set_title(panel.title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=ax.transAxes)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _mark_verified(ax, records: list[dict[str, Any]]) -> None:
    """Ring the syncs verified bit for bit (`sync/verified` 1), cross the ones whose check failed (0)."""
    checked = [r for r in records if VERIFIED_KEY in r and SYNC_KEY in r]
    for passed, style in ((True, {"marker": "o", "facecolors": "none", "edgecolors": "tab:green", "s": 80}),
                          (False, {"marker": "x", "color": "tab:red", "s": 80})):
        points = [(r["step"], r[SYNC_KEY]) for r in checked if (r[VERIFIED_KEY] == 1.0) is passed]
        if points:
            label = "verified bit for bit" if passed else "verification failed"
            steps, seconds = zip(*points)
            ax.scatter(steps, seconds, label=f"{label} ({len(points)})", zorder=3, **style)
