"""Short trial runs for `rapid-tune sweep` and `rapid-tune recommend`.

Used by the rapid-tune process. A trial is a real `rapid-run` (learner plus
actors as child processes) of the base config plus the trial's overrides, with
a training-time budget (`run.max_seconds`) and, by default, held-out
evaluation only at the start and the end. Its output goes to
RUN_DIR/rapid-run.log; `summary` turns its metrics into one comparison row
(`measure.measure_run`: rates over the steady window, after start-up).

Timings are only as good as the machine is quiet: RUN_DIR/trial.json records
the share of the CPUs that *other* processes used during the trial (machine
CPU time from /proc/stat less the trial's own, from getrusage), and the
tools print it when it is large.

`actors=N` is accepted as an override: it is the `--actors` of rapid-run, not
a config field.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from rapid_async.tune.measure import measure_run

ACTORS_KEY = "actors"


def split_actors(overrides: list[str], default: int | None) -> tuple[list[str], int | None]:
    """Take `actors=N` out of a list of overrides; return (config overrides, N)."""
    rest, actors = [], default
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == ACTORS_KEY:
            try:
                actors = int(value)
            except ValueError:
                raise ValueError(f"{item!r}: actors must be a whole number") from None
            if actors < 1:
                raise ValueError(f"{item!r}: at least 1 actor")
        else:
            rest.append(item)
    return rest, actors


def trial_command(config: str | None, overrides: list[str], run_dir: Path, budget_s: float,
                  actors: int | None, eval_every: int = 0,
                  max_steps: int | None = None) -> list[str]:
    """The rapid-run command line of one trial: it stops at `budget_s` seconds,
    or after `max_steps` updates when given (the budget is then an upper bound)."""
    sets, actors = split_actors(overrides, actors)
    steps = 1000000 if max_steps is None else max_steps
    sets = [*sets, f"run.run_dir={run_dir}", f"run.max_seconds={budget_s}",
            f"run.max_steps={steps}", f"run.eval_every={eval_every}", "run.checkpoint_every=0"]
    cmd = [sys.executable, "-m", "rapid_async.cli", "run"]
    if config:
        cmd += ["--config", config]
    if actors:
        cmd += ["--actors", str(actors)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run_trial(config: str | None, overrides: list[str], run_dir: Path, budget_s: float,
              actors: int | None = None, eval_every: int = 0,
              on_poll: Callable[[Path], None] | None = None,
              max_steps: int | None = None) -> Path:
    """Run one trial to completion (see `trial_command`); return its run directory.

    Raises:
        RuntimeError: naming the trial and the tail of its log when it fails.
    """
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cmd = trial_command(config, overrides, run_dir, budget_s, actors, eval_every, max_steps)
    log_path = run_dir / "rapid-run.log"
    cpu0, own0, t0 = _machine_cpu_s(), _children_cpu_s(), time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                if on_poll:
                    on_poll(run_dir)
                time.sleep(1.0)
        except BaseException:
            proc.terminate()  # rapid-run stops its own children on TERM
            proc.wait(timeout=60)
            raise
    wall = time.monotonic() - t0
    foreign = None
    if cpu0 is not None:
        other = (_machine_cpu_s() - cpu0) - (_children_cpu_s() - own0)
        foreign = max(0.0, other / (wall * (os.cpu_count() or 1)))
    (run_dir / "trial.json").write_text(json.dumps(
        {"command": cmd, "wall_s": wall, "foreign_cpu_frac": foreign}))
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"trial {' '.join(overrides) or '(base)'} failed (exit "
                           f"{proc.returncode}); {log_path}:\n{tail}")
    return run_dir


def _machine_cpu_s() -> float | None:
    """CPU seconds the whole machine has spent busy (Linux /proc/stat), or None."""
    try:
        fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def foreign_load(run_dir: Path) -> float | None:
    """Share of the machine's CPUs that other processes used during a trial."""
    try:
        return json.loads((run_dir / "trial.json").read_text()).get("foreign_cpu_frac")
    except (OSError, ValueError):
        return None


def cpu_busy_fraction(seconds: float = 2.0) -> float | None:
    """Share of the machine's CPUs busy over the next `seconds` (None off Linux)."""
    a = _machine_cpu_s()
    time.sleep(seconds)
    b = _machine_cpu_s()
    if a is None or b is None:
        return None
    return (b - a) / (seconds * (os.cpu_count() or 1))


def wait_for_quiet(limit: float, timeout_s: float = 600.0) -> float:
    """Wait until other processes use at most `limit` of the CPUs (sampled over 3 s),
    or `timeout_s`; return the last busy fraction (0 when it cannot be measured)."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy = cpu_busy_fraction(3.0)
        if busy is None or busy <= limit or time.monotonic() > deadline:
            return busy or 0.0
        time.sleep(5.0)


def summary(run_dir: Path) -> dict[str, Any]:
    """One comparison row of a finished trial (whole-run rates when it is too
    short for a steady window)."""
    try:
        r = measure_run(run_dir)
    except ValueError:
        return _short_summary(run_dir)
    actors = r.actors
    busy = [a.busy_frac for a in actors if math.isfinite(a.busy_frac)]
    evals = [s for _, s in r.success]
    return {
        "updates_per_s": r.updates_per_s,
        "groups_per_s": r.generated / r.window_s if r.window_s else 0.0,
        "learner_busy": 1.0 - r.learner_fracs().get("wait_s", 0.0),
        "learner_wait": r.learner_fracs().get("wait_s", 0.0),
        "actor_busy": sum(busy) / len(busy) if busy else float("nan"),
        "mean_staleness": r.staleness_mean,
        "max_staleness_seen": r.staleness_max,
        "dropped_stale": r.dropped,
        "drop_frac": r.drop_frac,
        "truncated_frac": r.truncated_frac,
        "ess_per_group": r.ess_per_group,
        "steps": r.steps,
        "actors": len(actors),
        "success_before": evals[0] if evals else None,
        "success_after": evals[-1] if evals else None,
        "foreign_cpu": foreign_load(run_dir),
    }


def _short_summary(run_dir: Path) -> dict[str, Any]:
    """A row from whole-run numbers, for a trial with too few steps to measure."""
    from rapid_async.metrics import read_metrics

    recs = read_metrics(run_dir)
    steps = [r for r in recs if r.get("role") == "learner" and "learner/busy_s" in r]
    evals = [r["eval/success"] for r in recs if r.get("role") == "learner"
             and isinstance(r.get("eval/success"), (int, float))]
    last = steps[-1] if steps else {}
    nan = float("nan")
    return {
        "updates_per_s": len(steps) / last["train_s"] if steps and last.get("train_s") else 0.0,
        "groups_per_s": nan, "learner_busy": last.get("learner/busy_frac", nan),
        "learner_wait": nan, "actor_busy": nan,
        "mean_staleness": (sum(r["staleness/mean"] for r in steps) / len(steps)) if steps else nan,
        "max_staleness_seen": max((r["staleness/max"] for r in steps), default=nan),
        "dropped_stale": last.get("buffer/dropped_stale", 0), "drop_frac": nan,
        "truncated_frac": nan, "ess_per_group": nan, "steps": len(steps),
        "actors": len({r.get("actor_id") for r in recs if r.get("role") == "actor"}),
        "success_before": evals[0] if evals else None,
        "success_after": evals[-1] if evals else None,
    }
