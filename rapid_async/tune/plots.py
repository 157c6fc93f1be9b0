"""PNG plots of a `rapid-tune sweep` (used by the rapid-tune process).

sweep.png: updates per second and final held-out success of each trial against
its mean staleness and against its number of actors, each point labelled with
the trial's settings. rewards.png: training reward (lines) and held-out
success (markers) against training time, one colour per trial.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _label(overrides: list[str]) -> str:
    return " ".join(o.split(".")[-1] for o in overrides) or "(base)"


def plot_sweep(rows: list[tuple[list[str], dict]], run_dirs: list[Path], root: Path) -> list[Path]:
    """Write root/sweep.png and root/rewards.png; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rapid_async.tune.measure import measure_run

    out = [root / "sweep.png", root / "rewards.png"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [("mean_staleness", "updates_per_s"), ("mean_staleness", "success_after"),
              ("actors", "updates_per_s"), ("actors", "success_after")]
    names = {"mean_staleness": "mean staleness (versions)", "updates_per_s": "updates / s",
             "success_after": "held-out success at the end", "actors": "actors"}
    for ax, (x, y) in zip(axes.flat, panels):
        for overrides, m in rows:
            xv, yv = m.get(x), m.get(y)
            if isinstance(xv, (int, float)) and isinstance(yv, (int, float)):
                ax.plot(xv, yv, "o")
                ax.annotate(_label(overrides), (xv, yv), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlabel(names[x])
        ax.set_ylabel(names[y])
        ax.grid(alpha=0.3)
    fig.suptitle(f"rapid-tune sweep: {root}")
    fig.tight_layout()
    fig.savefig(out[0], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 5))
    for (overrides, _), run_dir in zip(rows, run_dirs):
        run = _measured(measure_run, run_dir)
        if run is None:
            continue
        line, = ax.plot([t for t, _ in run.reward], [r for _, r in run.reward], alpha=0.7,
                        label=_label(overrides))
        ax.plot([t for t, _ in run.success], [s for _, s in run.success], "o",
                color=line.get_color())
    ax.set_xlabel("training time (s): wall time less held-out evaluations")
    ax.set_ylabel("reward (line), held-out success (dots)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out[1], dpi=90)
    plt.close(fig)
    return out


def _measured(measure: Any, run_dir: Path) -> Any:
    try:
        return measure(run_dir)
    except (ValueError, FileNotFoundError):
        return None
