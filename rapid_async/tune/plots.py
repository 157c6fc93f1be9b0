"""PNG plots of a `rapid-tune sweep` (used by the rapid-tune process).

sweep.png: updates per second and final held-out success of each trial against
its mean staleness and against its number of actors, one colour per trial.
rewards.png: training reward (smoothed lines) and held-out success (dots)
against training time, in the same colours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


SHORT = {"minibatch_groups": "mb", "batch_groups": "batch", "sync_every": "sync",
         "max_staleness": "stale", "buffer_groups": "buf", "chunk_groups": "chunk",
         "actors": "N", "devices": "dev"}


def _label(overrides: list[str]) -> str:
    """'learner.minibatch_groups=8 actors=2' -> 'mb=8 N=2'."""
    parts = []
    for o in overrides:
        key, _, value = o.partition("=")
        key = key.split(".")[-1]
        parts.append(f"{SHORT.get(key, key)}={value}")
    return " ".join(parts) or "(base)"


def _colors(n: int) -> list:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


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
    colors = _colors(len(rows))
    for ax, (x, y) in zip(axes.flat, panels):
        for (overrides, m), color in zip(rows, colors):
            xv, yv = m.get(x), m.get(y)
            if isinstance(xv, (int, float)) and isinstance(yv, (int, float)):
                ax.plot(xv, yv, "o", color=color, markersize=8, label=_label(overrides))
        ax.set_xlabel(names[x])
        ax.set_ylabel(names[y])
        if x == "actors":
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, title="trial")
    fig.suptitle(f"rapid-tune sweep: {root}")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(out[0], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 5))
    for (overrides, _), run_dir, color in zip(rows, run_dirs, colors):
        run = _measured(measure_run, run_dir)
        if run is None:
            continue
        ax.plot([t for t, _ in run.reward], _smooth([r for _, r in run.reward]), alpha=0.8,
                color=color, label=_label(overrides))
        ax.plot([t for t, _ in run.success], [s for _, s in run.success], "o", color=color)
    ax.set_xlabel("training time (s): wall time less held-out evaluations")
    ax.set_ylabel("training reward (line, smoothed), held-out success (dots)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out[1], dpi=90)
    plt.close(fig)
    return out


def _smooth(values: list[float], alpha: float = 0.15) -> list[float]:
    """Exponential moving average (per-step rewards of small batches are noisy)."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else out[-1] + alpha * (v - out[-1]))
    return out


def _measured(measure: Any, run_dir: Path) -> Any:
    try:
        return measure(run_dir)
    except (ValueError, FileNotFoundError):
        return None
