"""Benchmark of `rapid-tune recommend` on the CPU task (`bin/bench-tune`).

Two phases, each short enough for one turn of the shared lock:

1. recommend: runs `rapid-tune recommend --config configs/quickstart.toml`
   exactly as a user would, and times it (the target: under 10 minutes on the
   2-core machine).
2. compare: trains the quickstart default and the recommended setting with
   3 seeds each, evaluating held-out success about every 2 s of training, and
   measures the training time (`train_s`: wall time less evaluations) until
   held-out success first reaches 0.6.

Then it writes benchmarks/results/tune-cpu.md: the recommendation with its
prediction and verification, the per-run table and the verdict. Each phase
saves its results under RUNS_ROOT so that they can run as separate commands.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import typer

from rapid_async.tune.measure import measure_run
from rapid_async.tune.trials import foreign_load, run_trial

EVAL_EVERY_S = 2.0
"""Held-out evaluation about this often (training seconds) in the compare phase."""


def phase_recommend(config: str, root: Path, budget_s: float | None) -> dict:
    cmd = [sys.executable, "-m", "rapid_async.cli", "tune", "recommend", "--config", config,
           "--root", str(root / "recommend")]
    if budget_s:
        cmd += ["--budget-s", str(budget_s)]
    print(f"[bench-tune] {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    print(proc.stdout[-4000:], proc.stderr[-2000:] if proc.returncode else "", flush=True)
    if proc.returncode != 0:
        raise typer.Exit(1)
    result = json.loads((root / "recommend" / "recommend.json").read_text())
    foreign = {p.name: foreign_load(p) for p in sorted((root / "recommend").glob("*"))
               if (p / "trial.json").is_file()}
    saved = {"command": "rapid-tune " + " ".join(cmd[4:]), "wall_s": wall, "stdout": proc.stdout,
             "result": result, "foreign_cpu": foreign}
    (root / "phase-recommend.json").write_text(json.dumps(saved, indent=1, default=str))
    return saved


def time_to(run_dir: Path, target: float) -> tuple[float | None, float, float]:
    """(training seconds until held-out success >= target or None, final success, steps/s)."""
    run = measure_run(run_dir)
    reached = next((t for t, s in run.success if s >= target), None)
    return reached, run.success[-1][1], run.updates_per_s


def phase_compare(config: str, root: Path, seeds: int, budget_s: float, target: float) -> dict:
    rec = json.loads((root / "phase-recommend.json").read_text())["result"]
    setups = {
        "quickstart default": (config, 1, rec["base"]["measured"]["updates_per_s"]),
        "recommended": (rec["toml"], rec["recommended"]["setting"]["actors"],
                        rec["recommended"].get("measured", rec["recommended"]["predicted"])
                        ["updates_per_s"]),
    }
    rows = []
    for name, (cfg_path, actors, rate) in setups.items():
        eval_every = max(1, round(EVAL_EVERY_S * rate))
        for seed in range(seeds):
            run_dir = root / "compare" / f"{name.split()[0]}-seed{seed}"
            print(f"[bench-tune] {name} seed {seed}: --config {cfg_path} --actors {actors} "
                  f"eval every {eval_every}", flush=True)
            run_trial(cfg_path, [f"run.seed={seed}"], run_dir, budget_s, actors,
                      eval_every=eval_every)
            reached, final, rate_measured = time_to(run_dir, target)
            rows.append({"setup": name, "seed": seed, "time_to_target": reached, "final": final,
                         "updates_per_s": rate_measured, "eval_every": eval_every,
                         "foreign_cpu": foreign_load(run_dir)})
            print(f"[bench-tune]   {rows[-1]}", flush=True)
    saved = {"rows": rows, "budget_s": budget_s, "target": target, "seeds": seeds}
    (root / "phase-compare.json").write_text(json.dumps(saved, indent=1))
    return saved


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def write_results(root: Path, out: Path) -> None:
    rec = json.loads((root / "phase-recommend.json").read_text())
    cmp_ = json.loads((root / "phase-compare.json").read_text())
    result, rows, target = rec["result"], cmp_["rows"], cmp_["target"]
    from rapid_async.tune.model import Setting
    from rapid_async.tune.recommend import comparison, config_lines

    lines = ["# rapid-tune recommend on the CPU task (tiny model, 2-digit arithmetic)", "",
             "Machine: the 2-core development box (shared; commands run under the shared "
             "lock). Command: `bin/bench-tune` (both phases).", "",
             f"## 1. `{rec['command']}`", "",
             f"Wall time: {rec['wall_s']:.0f} s ({rec['wall_s'] / 60:.1f} min; target under 10 "
             f"min -> {'met' if rec['wall_s'] < 600 else 'NOT met'}). "
             f"{result['compared']} settings compared.", "",
             "Recommended: `" + "`, `".join(config_lines(Setting(**result["recommended"]["setting"])))
             + "`", "", "Verification trial of the recommended setting:", "",
             comparison(result["recommended"]["predicted"], result["recommended"]["measured"]), "",
             "The quickstart default (calibration trial 1):", "",
             comparison(result["base"]["predicted"], result["base"]["measured"]), "",
             "Share of the CPUs used by other processes during each trial: "
             + ", ".join(f"{k} {_fmt(v, '.0%')}" for k, v in rec["foreign_cpu"].items()), "",
             f"## 2. Time to held-out success {target:g} ({cmp_['seeds']} seeds, "
             f"{cmp_['budget_s']:g} s of training each)", "",
             "Time is training time (wall time less held-out evaluations); evaluation about "
             f"every {EVAL_EVERY_S:g} s of training.", "",
             "| setup | seed | time to target (s) | final success | updates/s | eval every "
             "| CPUs used by others |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setup']} | {r['seed']} | {_fmt(r['time_to_target'], '.1f')} | "
                     f"{r['final']:.3f} | {r['updates_per_s']:.2f} | {r['eval_every']} | "
                     f"{_fmt(r.get('foreign_cpu'), '.0%')} |")
    means = {}
    for setup in dict.fromkeys(r["setup"] for r in rows):
        rs = [r for r in rows if r["setup"] == setup]
        # a run that never reaches the target counts with the whole budget (a lower bound)
        means[setup] = statistics.mean(r["time_to_target"] if r["time_to_target"] is not None
                                       else cmp_["budget_s"] for r in rs)
        reached = sum(r["time_to_target"] is not None for r in rs)
        final = statistics.mean(r["final"] for r in rs)
        lines.append(f"| **{setup}**, mean | | {means[setup]:.1f} ({reached}/{len(rs)} reached) "
                     f"| {final:.3f} | | | |")
    finals = {s: statistics.mean(r["final"] for r in rows if r["setup"] == s) for s in means}
    d, r = means.get("quickstart default"), means.get("recommended")
    if d and r:
        lines += ["", f"Final held-out success after {cmp_['budget_s']:g} s: recommended "
                      f"{finals['recommended']:.3f}, default {finals['quickstart default']:.3f} "
                      f"({100 * (finals['recommended'] - finals['quickstart default']):+.1f} "
                      "points)."]
        lines += ["", f"Recommended vs default: {r:.1f} s vs {d:.1f} s "
                      f"({1 - r / d:.0%} less time) -> "
                      f"{'met' if r < d else 'NOT met'}: the recommended setting reaches "
                      f"{target:g} {'sooner' if r < d else 'not sooner'}."]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"[bench-tune] wrote {out}", flush=True)


def main(phase: str = typer.Option("all", help="recommend, compare, write or all."),
         config: str = typer.Option("configs/quickstart.toml", help="Base config."),
         seeds: int = typer.Option(3, help="Seeds per setup in the compare phase."),
         budget_s: float = typer.Option(40.0, help="Training seconds per compare run."),
         recommend_budget_s: float = typer.Option(0.0, help="--budget-s of recommend (0: its default)."),
         target: float = typer.Option(0.6, help="Held-out success to reach."),
         runs_root: str = typer.Option("runs/bench-tune", help="Where the runs go."),
         out: str = typer.Option("benchmarks/results/tune-cpu.md", help="Result file."),
         ) -> None:
    """Time rapid-tune recommend, then race its setting against the default."""
    root = Path(runs_root)
    root.mkdir(parents=True, exist_ok=True)
    if phase in ("recommend", "all"):
        phase_recommend(config, root, recommend_budget_s or None)
    if phase in ("compare", "all"):
        phase_compare(config, root, seeds, budget_s, target)
    if phase in ("write", "compare", "all"):
        write_results(root, Path(out))


if __name__ == "__main__":
    typer.run(main)
