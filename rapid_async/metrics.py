"""Metrics: JSONL records, a one-line progress display, and PNG plots.

Every process appends records to RUN_DIR/metrics.jsonl, one JSON object per
line, each tagged with its `role` ("learner" or "actor") and the wall time,
and, when `[metrics] backends` asks for it, to TensorBoard and Weights &
Biases as well (`rapid_async.metrics_backends`).
Appends of single short lines are atomic enough for several writers on one
node; `read_metrics` skips a torn or foreign line instead of failing.
`plot_run` draws reward and held-out success against wall time, throughput
and staleness (`rapid-plot RUN_DIR`); a held-out result is drawn at the time
its policy version was made, since it arrives later from an actor.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("rapid.metrics")


class MetricsWriter:
    """Append-only JSONL writer for one role, forwarding to optional backends.

    Args:
        run_dir: the run directory (metrics.jsonl goes there).
        role: "learner" or "actor", stored in every record.
        backends: opened `metrics_backends` (TensorBoard, W&B) that also get
            every record's numeric fields; one that fails is dropped with a warning.
    """

    def __init__(self, run_dir: str | Path, role: str, backends: list[Any] | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.role = role
        self.backends = list(backends or [])
        self._count = 0

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        rec = {"role": self.role, "time": time.time(), **record}
        line = json.dumps(rec, default=_json_default, allow_nan=False) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
        self._count += 1
        if self.backends:
            self._forward(json.loads(line))
        return rec

    def _forward(self, rec: dict[str, Any]) -> None:
        step = rec["step"] if isinstance(rec.get("step"), int) else self._count
        for backend in list(self.backends):
            try:
                backend.write(rec, step)
            except Exception as exc:  # a dashboard problem must not stop training
                log.warning("metrics backend %s failed (%s); leaving it out",
                            type(backend).__name__, exc)
                self.backends.remove(backend)

    def close(self) -> None:
        """Flush and close the backends (metrics.jsonl needs nothing)."""
        for backend in self.backends:
            try:
                backend.close()
            except Exception as exc:
                log.warning("closing metrics backend %s failed: %s", type(backend).__name__, exc)
        self.backends = []


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"metrics: cannot serialise {type(obj).__name__}")


def clean(record: dict[str, Any]) -> dict[str, Any]:
    """Replace non-finite floats by None (JSON has no NaN)."""
    out: dict[str, Any] = {}
    for k, v in record.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
        elif isinstance(v, dict):
            out[k] = clean(v)
        else:
            out[k] = v
    return out


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All well-formed records of a run, in file order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory?")
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        # A foreign line (not written by MetricsWriter) lacks role / time.
        if isinstance(rec, dict) and isinstance(rec.get("role"), str) \
                and isinstance(rec.get("time"), (int, float)):
            out.append(rec)
    return out


def progress_line(rec: dict[str, Any]) -> str:
    """One human line from a learner record."""
    def f(key: str, fmt: str, default: str = "-") -> str:
        v = rec.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) else default

    heldout = f("eval/success", ".3f")
    if isinstance(rec.get("eval/version"), int) and heldout != "-":
        heldout += f"@v{rec['eval/version']}"
    return (f"step {f('step', 'd')} v{f('version', 'd')} "
            f"reward {f('reward/mean', '.3f')} heldout {heldout} "
            f"tok/s {f('throughput/tokens_per_s', '.0f')} "
            f"staleness {f('staleness/mean', '.2f')} "
            f"busy {f('learner/busy_frac', '.0%')} "
            f"t {f('elapsed_s', '.0f')}s")


def eval_series(recs: list[dict[str, Any]], key: str, t0: float) -> tuple[list[float], list[float]]:
    """Held-out evaluation results placed at the time their policy version was
    made (`eval/time`), not when the result arrived; sorted by that time."""
    pts = sorted(((r.get("eval/time") or r["time"]) - t0, r[key]) for r in recs
                 if r.get("role") == "learner" and isinstance(r.get(key), (int, float)))
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw a run's metrics as one PNG with four panels; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(run_dir)
    learner = [r for r in recs if r.get("role") == "learner" and "step" in r]
    if not learner:
        raise ValueError(f"{run_dir}: no learner records to plot yet")
    t0 = min(r["time"] for r in recs)
    out = Path(out) if out else Path(run_dir) / "plots.png"
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))

    def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
        pts = [(r["time"] - t0, r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    ax = axes[0][0]
    ax.plot(*series(learner, "reward/mean"), label="train reward", alpha=0.7)
    for key, label in (("eval/success", "held-out success (greedy)"),
                       ("eval/pass@1", "held-out pass@1")):
        ax.plot(*eval_series(recs, key, t0), "o-", label=label)
    ax.set_xlabel("wall time (s)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("reward and held-out success")
    ax.legend()

    ax = axes[0][1]
    actors = sorted({r.get("actor_id") for r in recs if r.get("role") == "actor"} - {None})
    for a in actors:
        ax.plot(*series([r for r in recs if r.get("actor_id") == a], "actor/tokens_per_s"),
                label=f"actor {a}")
    ax.plot(*series(learner, "throughput/tokens_per_s"), label="consumed by learner")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("tokens / s")
    ax.set_title("throughput")
    ax.legend()

    ax = axes[1][0]
    ax.plot(*series(learner, "staleness/mean"), label="mean")
    ax.plot(*series(learner, "staleness/max"), label="max")
    ax.set_xlabel("wall time (s)")
    ax.set_title("staleness of consumed groups (versions)")
    ax.legend()

    ax = axes[1][1]
    hist = next((r["staleness/hist"] for r in reversed(learner) if r.get("staleness/hist")), {})
    if hist:
        ks = sorted(hist, key=int)
        ax.bar([int(k) for k in ks], [hist[k] for k in ks])
    ax.set_xlabel("staleness (versions)")
    ax.set_ylabel("groups consumed")
    ax.set_title("staleness histogram")

    fig.suptitle(str(run_dir))
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
