"""`rapid-tune sweep`: short trials over a grid of settings, compared in a table and plots.

Used from the command line on one node. Each trial is a real `rapid-run`
(`trials.run_trial`) of the base config with the trial's overrides and a short
training-time budget, or a number of updates (`--steps`, with the budget as an
upper bound: trials that compare on equal work, whatever the machine's speed);
`actors=1,2` varies the number of actors. The results
go to ROOT/tune.md (a markdown table), ROOT/tune.csv and ROOT/tune.json (one
row per trial: updates/s over the steady window, groups generated per second,
learner and actor busy fractions, staleness, groups dropped, truncated-weight
fraction, ESS, held-out success before and after) and two PNGs:
ROOT/sweep.png (updates/s and final held-out success against mean staleness
and against actors) and ROOT/rewards.png (training reward against wall time,
one line per trial). A progress bar (rich) follows the trials:

    rapid-tune sweep --config configs/quickstart.toml \\
        --grid learner.max_staleness=1,2,4 --grid actors=1,2 --budget-s 60
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from typing import Any

from rapid_async.tune.trials import ACTORS_KEY, run_trial, split_actors, summary

COLUMNS = ["updates_per_s", "groups_per_s", "learner_busy", "actor_busy", "mean_staleness",
           "dropped_stale", "drop_frac", "truncated_frac", "ess_per_group", "steps", "actors",
           "success_before", "success_after"]


def parse_grid(items: list[str]) -> list[list[str]]:
    """["a.b=1,2", "c.d=x"] -> [["a.b=1", "c.d=x"], ["a.b=2", "c.d=x"]]."""
    axes = []
    for item in items:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or ("." not in key and key != ACTORS_KEY):
            raise ValueError(f"--grid {item!r}: expected section.key=v1,v2,... or actors=1,2")
        values = item.split("=", 1)[1]
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not choices:
            raise ValueError(f"--grid {item!r}: no values")
        axes.append([f"{key}={v}" for v in choices])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def _f(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else format(v, spec)


def table(rows: list[tuple[list[str], dict]]) -> str:
    """Markdown table of trial rows."""
    lines = ["| trial | updates/s | groups/s | learner busy | actor busy | staleness "
             "| dropped | truncated | ESS | success before -> after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for overrides, m in rows:
        lines.append(
            f"| {' '.join(overrides) or '(base)'} | {_f(m['updates_per_s'], '.2f')} | "
            f"{_f(m['groups_per_s'], '.0f')} | {_f(m['learner_busy'], '.0%')} | "
            f"{_f(m['actor_busy'], '.0%')} | {_f(m['mean_staleness'], '.2f')} | "
            f"{m['dropped_stale']} ({_f(m['drop_frac'], '.0%')}) | "
            f"{_f(m['truncated_frac'], '.3f')} | {_f(m['ess_per_group'], '.3f')} | "
            f"{_f(m['success_before'], '.3f')} -> {_f(m['success_after'], '.3f')} |")
    return "\n".join(lines)


def write_results(rows: list[tuple[list[str], dict]], root: Path, header: str) -> list[Path]:
    """tune.md, tune.csv and tune.json under `root`; returns their paths."""
    root.mkdir(parents=True, exist_ok=True)
    md, csv_path, js = root / "tune.md", root / "tune.csv", root / "tune.json"
    md.write_text(f"{header}\n\n{table(rows)}\n")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", *COLUMNS])
        for overrides, m in rows:
            w.writerow([" ".join(overrides) or "(base)", *(m.get(c) for c in COLUMNS)])
    js.write_text(json.dumps([{"trial": overrides, **m} for overrides, m in rows], indent=1,
                             default=str, allow_nan=True))
    return [md, csv_path, js]


def sweep(config: str | None, grid: list[str], budget_s: float, root: Path,
          actors: int | None = None, fixed: list[str] | None = None,
          eval_every: int = 0, max_steps: int | None = None) -> list[tuple[list[str], dict]]:
    """Run every trial of the grid (plus the `fixed` overrides); write and return
    the comparison. Each trial trains for `budget_s` seconds, or for `max_steps`
    updates when given (then `budget_s` only bounds it). A trial that made no
    update has steps 0 and "-" for its rates and staleness, and a warning says so."""
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"--steps must be at least 1, got {max_steps}")
    from rapid_async.config import load_config
    from rapid_async.progress import ProgressDisplay
    from rapid_async.tune.plots import plot_sweep

    fixed = fixed or []
    trials = parse_grid(grid)
    for overrides in trials:  # fail on a bad value before spending time on runs
        load_config(config, split_actors([*fixed, *overrides], actors)[0])
    rows: list[tuple[list[str], dict]] = []
    with ProgressDisplay("[rapid-tune]", total=len(trials), every_s=10.0) as display:
        for i, overrides in enumerate(trials):
            label = " ".join(overrides) or "(base)"
            display.log(f"[rapid-tune] trial {i + 1}/{len(trials)}: {label}")

            def poll(run_dir: Path, i: int = i, label: str = label) -> None:
                display.update(i, status=f"trial {i + 1}: {label} {_trial_status(run_dir)}")

            run_dir = run_trial(config, [*fixed, *overrides], root / f"trial-{i}", budget_s,
                                actors, eval_every=eval_every, on_poll=poll, max_steps=max_steps)
            rows.append((overrides, summary(run_dir)))
            if not rows[-1][1]["steps"]:
                display.log(f"[rapid-tune] warning: trial {i + 1} ({label}) made no update in "
                            f"{budget_s:g} s; its rates and staleness are '-' (raise --budget-s, "
                            "or give --steps)")
            display.update(i + 1, status=f"trial {i + 1} done")
            display.log(table(rows[-1:]).splitlines()[-1])
    length = f"{max_steps} updates (at most {budget_s:g} s)" if max_steps else f"{budget_s:g} s"
    header = (f"# rapid-tune sweep: {len(trials)} trials of {length} training each\n\n"
              f"Base config: `{config}`; for every trial: `{' '.join(fixed) or '-'}`. "
              "Rates are over each trial's steady window (after start-up).")
    paths = write_results(rows, root, header)
    paths += plot_sweep(rows, [root / f"trial-{i}" for i in range(len(trials))], root)
    print(f"[rapid-tune] wrote {', '.join(str(p) for p in paths)}", flush=True)
    return rows


def _trial_status(run_dir: Path) -> str:
    from rapid_async.launch import _last_learner_record

    rec = _last_learner_record(run_dir)
    if not rec:
        return "(starting)"
    return f"step {rec.get('step', '-')} t {rec.get('train_s', 0):.0f}s"
