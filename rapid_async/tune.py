"""`rapid-tune`: short trial runs over a grid of settings, compared in one table.

Used from the command line on one node. Each trial is a real `rapid-run`
(learner plus actors) with the base config, the trial's overrides and a short
training-time budget; evaluation happens only at the start and the end. The
table shows, per trial: updates per second, generated and consumed tokens/s,
learner and actor busy %, mean staleness, groups dropped as stale, and the
held-out success before and after, so that staleness and batch sizes can be
chosen from measurements rather than guesses:

    rapid-tune --config configs/quickstart.toml \\
        --grid learner.max_staleness=1,2,4 --grid learner.minibatch_groups=16,32 --budget-s 60
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

from rapid_async.metrics import read_metrics


def parse_grid(items: list[str]) -> list[list[str]]:
    """["a.b=1,2", "c.d=x"] -> [["a.b=1", "c.d=x"], ["a.b=2", "c.d=x"]]."""
    axes = []
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"--grid {item!r}: expected section.key=v1,v2,...")
        key, values = item.split("=", 1)
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not choices:
            raise ValueError(f"--grid {item!r}: no values")
        axes.append([f"{key.strip()}={v}" for v in choices])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def trial_summary(run_dir: Path) -> dict:
    """What a trial run measured (see the module docstring)."""
    recs = read_metrics(run_dir)
    learner = [r for r in recs if r.get("role") == "learner"]
    steps = [r for r in learner if "loss/policy" in r]
    if not steps:
        raise ValueError(f"{run_dir}: the trial made no optimizer step")
    evals = [r["eval/success"] for r in learner if isinstance(r.get("eval/success"), (int, float))]
    actors = {}
    for r in recs:
        if r.get("role") == "actor":
            actors[r.get("actor_id")] = r
    last = steps[-1]
    train_s = last["train_s"]
    gen_tokens = sum(a.get("actor/tokens", 0) for a in actors.values())
    busy = [a.get("actor/busy_frac", 0.0) for a in actors.values()]
    return {
        "updates_per_s": len(steps) / train_s,
        "gen_tokens_per_s": gen_tokens / train_s,
        "consumed_tokens_per_s": last["throughput/tokens_per_s"],
        "learner_busy": last["learner/busy_frac"],
        "actor_busy": sum(busy) / len(busy) if busy else 0.0,
        "mean_staleness": sum(r["staleness/mean"] for r in steps) / len(steps),
        "dropped_stale": last.get("buffer/dropped_stale", 0),
        "success_before": evals[0] if evals else None,
        "success_after": evals[-1] if evals else None,
    }


def run_trial(config: str | None, overrides: list[str], run_dir: Path, budget_s: float,
              actors: int | None) -> dict:
    sets = [*overrides, f"run.run_dir={run_dir}", f"run.max_seconds={budget_s}",
            "run.max_steps=1000000", "run.eval_every=0", "run.checkpoint_every=0"]
    cmd = [sys.executable, "-m", "rapid_async.cli", "run"]
    if config:
        cmd += ["--config", config]
    if actors:
        cmd += ["--actors", str(actors)]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"trial {' '.join(overrides) or '(base)'} failed (exit "
                           f"{proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return trial_summary(run_dir)


def table(rows: list[tuple[list[str], dict]]) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    lines = ["| trial | updates/s | gen tok/s | consumed tok/s | learner busy | actor busy "
             "| staleness | dropped | success before -> after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for overrides, m in rows:
        lines.append(
            f"| {' '.join(overrides) or '(base)'} | {m['updates_per_s']:.2f} | "
            f"{m['gen_tokens_per_s']:.0f} | {m['consumed_tokens_per_s']:.0f} | "
            f"{m['learner_busy']:.0%} | {m['actor_busy']:.0%} | {m['mean_staleness']:.2f} | "
            f"{m['dropped_stale']} | {f(m['success_before'], '.3f')} -> "
            f"{f(m['success_after'], '.3f')} |")
    return "\n".join(lines)


def tune(config: str | None, grid: list[str], budget_s: float, root: Path,
         actors: int | None = None, out: Path | None = None,
         fixed: list[str] | None = None) -> list[tuple[list[str], dict]]:
    """Run every trial of the grid (plus the `fixed` overrides); write and
    return the comparison."""
    from rapid_async.config import load_config

    fixed = fixed or []
    trials = parse_grid(grid)
    for overrides in trials:  # fail on a bad value before spending time on runs
        load_config(config, [*fixed, *overrides])
    rows = []
    for i, overrides in enumerate(trials):
        print(f"[rapid-tune] trial {i + 1}/{len(trials)}: {' '.join(overrides) or '(base)'}",
              flush=True)
        rows.append((overrides, run_trial(config, [*fixed, *overrides], root / f"trial-{i}",
                                          budget_s, actors)))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = (f"# rapid-tune: {len(trials)} trials of {budget_s:g} s training each\n\n"
            f"Base config: `{config}`; for every trial: `{' '.join(fixed) or '-'}`\n\n"
            f"{table(rows)}\n")
    out = out or root / "tune.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"[rapid-tune] wrote {out}", flush=True)
    return rows
