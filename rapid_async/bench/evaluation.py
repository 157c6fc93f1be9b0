"""Benchmark: does held-out evaluation pause the learner? (`bin/bench-eval`)

Runs the quickstart (`rapid-run`, one learner core and one actor core, the
tiny warm model on 2-digit arithmetic) with evaluation at different rates:
every 25 versions (the quickstart's setting, 200 steps, so the run also shows
held-out success before and after), every 5 versions and only at the start
and end. Evaluation is the actor's work, so the learner's busy fraction should
not depend on the rate; the table says how much time each role spent on it.
Writes benchmarks/results/eval-cpu.md.

Busy fraction here is measured over the learner's whole training wall time:
(training + publishing + checkpointing) / elapsed, with time spent waiting
for an evaluation counted against it (`learner/busy_frac` itself excludes
`learner/eval_s` from its denominator).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import typer

from rapid_async.metrics import read_metrics

BEFORE = (
    "Before this change (one measurement, kept for reference; main at e31d48e, where the "
    "learner evaluated on its training thread through a second model copy; same 2-core "
    "machine, under the lock, quickstart as in the first row): learner busy 93.5% of wall "
    "time (`learner/busy_frac` 94.9%), 1.13 s of 73.5 s paused for 10 evaluations; "
    "held-out success 0.250 -> 0.875.")

VARIANTS = [  # (label, eval_every, max_steps)
    ("every 25 (quickstart)", 25, 200),
    ("every 5", 5, 100),
    ("start and end only", 0, 100),
]


def summarise(run_dir: Path) -> dict:
    """The learner's time split and the evaluations of one run."""
    recs = read_metrics(run_dir)
    steps = [r for r in recs if r.get("role") == "learner" and "loss/policy" in r]
    last = steps[-1]
    evals = sorted((r["eval/version"], r["eval/success"]) for r in recs
                   if r.get("event") == "eval" and isinstance(r.get("eval/success"), float))
    actors = [r for r in recs if r.get("role") == "actor"]
    actor = actors[-1] if actors else {}
    busy = last["learner/busy_s"] + last["learner/publish_s"] + last["learner/checkpoint_s"]
    return {
        "steps": len(steps), "elapsed_s": last["elapsed_s"],
        "busy_wall": busy / last["elapsed_s"], "busy_frac": last["learner/busy_frac"],
        "learner_eval_s": last["learner/eval_s"], "learner_wait_s": last["learner/wait_s"],
        "actor_eval_s": actor.get("actor/eval_s", 0.0), "actor_evals": actor.get("actor/evals", 0),
        "actor_busy": actor.get("actor/busy_frac", float("nan")),
        "evals": evals, "lag_s": max((r.get("eval/lag_s", 0.0) for r in recs
                                      if r.get("event") == "eval"
                                      and r.get("eval/kind") != "start"), default=0.0),
    }


def main(config: str = typer.Option("configs/quickstart.toml", help="Base config."),
         out: str = typer.Option("benchmarks/results/eval-cpu.md", help="Result file."),
         runs_root: str = typer.Option("runs/bench-eval", help="Where the runs go."),
         ) -> None:
    """Run the quickstart at three evaluation rates and write the table."""
    rows = []
    for label, every, steps in VARIANTS:
        run_dir = Path(runs_root) / f"eval-every-{every}"
        if run_dir.exists():
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        sets = [f"run.eval_every={every}", f"run.max_steps={steps}", f"run.run_dir={run_dir}"]
        cmd = [sys.executable, "-m", "rapid_async.cli", "run", "--config", config, "--actors", "1",
               *sum((["--set", s] for s in sets), [])]
        print(f"[bench-eval] {label}: {' '.join(cmd[2:])}", flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise typer.Exit(1)
        row = {"label": label, "every": every, "wall_s": time.time() - t0, **summarise(run_dir)}
        print(f"[bench-eval]   {row}", flush=True)
        rows.append(row)
    write_table(rows, Path(out), config)
    print(f"[bench-eval] wrote {out}")


def write_table(rows: list[dict], out: Path, config: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Held-out evaluation off the training loop (CPU quickstart)",
        "",
        f"Command: `bin/bench-eval` (base config `{config}`: tiny warm model, 2-digit "
        "arithmetic, rapid-async, 1 learner core + 1 actor core, 200 held-out problems "
        "per evaluation, greedy).",
        "Machine: the 2-core development box, run under the shared lock.",
        "",
        "Learner busy = (training + publishing + checkpointing) / elapsed wall time; the "
        "learner's own `learner/busy_frac` leaves its `learner/eval_s` (time waiting for "
        "the final evaluation at shut-down) out of the denominator. Result lag: the "
        "longest time from a version's making to its result reaching the learner "
        "(periodic and final evaluations; the start one waits for the actor process "
        "to start).",
        "",
        "| evaluation | steps | learner busy (wall) | learner/busy_frac | learner eval_s | "
        "actor evals | actor eval_s | actor busy | result lag (s) | held-out success |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        evals = r["evals"]
        success = (f"{evals[0][1]:.3f} (v{evals[0][0]}) -> {evals[-1][1]:.3f} (v{evals[-1][0]})"
                   if evals else "-")
        lines.append(
            f"| {r['label']} | {r['steps']} | {r['busy_wall']:.1%} | {r['busy_frac']:.1%} | "
            f"{r['learner_eval_s']:.2f} | {r['actor_evals']:.0f} | {r['actor_eval_s']:.1f} | "
            f"{r['actor_busy']:.0%} | {r['lag_s']:.1f} | {success} |")
    lines += ["", BEFORE]
    lines += ["", "Evaluated versions per run: " + "; ".join(
        f"{r['label']}: {', '.join(f'v{v}' for v, _ in r['evals'])}" for r in rows), ""]
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    typer.run(main)
