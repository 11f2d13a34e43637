"""`rlsync plot RUN_DIR`: one PNG with reward, KL / mismatch and sync time per step.

Why these three: reward says whether the run learns; the trainer/engine
log-prob mismatch (and the KL to the reference, when the run keeps one) says
whether FP8 rollouts drift from the policy being trained; sync seconds say
what the colocated weight sync costs each step.

Uses matplotlib's Agg backend (no display needed), imported only here.

Limitations:
1. Reads `metrics.jsonl` only; a run that logged nothing yet has nothing to plot
   (`ValueError`).
"""

from __future__ import annotations

from pathlib import Path

from rlsync.rl.run import read_metrics

PANELS = (
    ("reward", ("reward",)),
    ("KL / mismatch", ("kl", "logprob_mismatch")),
    ("sync seconds", ("sync/seconds",)),
)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's curves to `out` (default `<run dir>/metrics.png`); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no records yet")
    out = Path(out) if out is not None else run_dir / "metrics.png"
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(7, 2.6 * len(PANELS)), sharex=True)
    for ax, (title, keys) in zip(axes, PANELS):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker=".", label=key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=ax.transAxes)
    axes[-1].set_xlabel("step")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
