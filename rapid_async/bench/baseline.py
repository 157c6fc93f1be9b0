"""Learning with the paper's group baseline vs the leave-one-out one (`bin/bench-baseline`).

Runs `rapid-run` on the CPU quickstart task (configs/quickstart.toml: tiny
warm-started model, 2-digit arithmetic, rapid-async, one learner and one
actor) for `algo.baseline` = paper and loo, several seeds, the same number of
optimizer steps each, and writes benchmarks/results/baseline-loo-cpu.md: the
held-out success at fixed policy versions (the evaluations the learner asks
an actor for every `run.eval_every` versions), per run and as a mean over
seeds. Heavy: run it under `flock /work/heavy.lock`.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import typer

from rapid_async.metrics import read_metrics

BASELINES = ("paper", "loo")


def evals_by_version(run_dir: Path) -> dict[int, float]:
    """{policy version: held-out success} of a run's learner records."""
    out: dict[int, float] = {}
    for r in read_metrics(run_dir):
        if r.get("role") == "learner" and isinstance(r.get("eval/success"), (int, float)):
            version = r.get("eval/version")
            if isinstance(version, int):
                out[version] = float(r["eval/success"])
    return out


def run_stats(run_dir: Path) -> dict[str, float]:
    """Steps, mean staleness and mean reward of a run's learner steps."""
    steps = [r for r in read_metrics(run_dir) if r.get("role") == "learner" and "loss/policy" in r]
    mean = (lambda k: statistics.fmean(r[k] for r in steps) if steps else float("nan"))
    return {"steps": len(steps), "staleness": mean("staleness/mean"), "reward": mean("reward/mean"),
            "ess": mean("is/ess_per_group")}


def _fmt(v: float | None) -> str:
    return "-" if v is None or v != v else f"{v:.3f}"


def write_table(rows: list[dict], versions: list[int], out: Path, command: str, sets: list[str]) -> None:
    lines = ["# Paper vs leave-one-out baseline on the CPU task", "",
             f"Command: `{command}` (2-core dev box, loaded; under `flock /work/heavy.lock`).",
             "Base config `configs/quickstart.toml` (tiny warm-started model, 2-digit arithmetic, "
             "rapid-async, one learner and one actor), overrides: "
             f"`{' '.join(sets)}`. Same steps for every run; held-out success (200 problems) "
             "of the policy at the given version.", "",
             "## Per run", "",
             "| baseline | seed | " + " | ".join(f"v{v}" for v in versions)
             + " | steps | mean staleness | mean train reward | mean ESS/K |",
             "|---|---|" + "---|" * (len(versions) + 4)]
    for r in rows:
        lines.append(f"| {r['baseline']} | {r['seed']} | "
                     + " | ".join(_fmt(r['evals'].get(v)) for v in versions)
                     + f" | {r['steps']} | {r['staleness']:.2f} | {r['reward']:.3f} | {r['ess']:.3f} |")
    lines += ["", "## Mean over seeds (held-out success)", "",
              "| baseline | " + " | ".join(f"v{v}" for v in versions) + " | mean over versions > 0 |",
              "|---|" + "---|" * (len(versions) + 1)]
    for b in BASELINES:
        mine = [r for r in rows if r["baseline"] == b]
        if not mine:
            continue
        means = []
        for v in versions:
            vals = [r["evals"][v] for r in mine if v in r["evals"]]
            means.append(statistics.fmean(vals) if vals else float("nan"))
        later = [m for v, m in zip(versions, means) if v > 0 and m == m]
        lines.append(f"| {b} | " + " | ".join(_fmt(m) for m in means)
                     + f" | {_fmt(statistics.fmean(later) if later else float('nan'))} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def main(seeds: int = typer.Option(3, help="Seeds per baseline."),
         steps: int = typer.Option(150, help="Optimizer steps per run."),
         eval_every: int = typer.Option(25, help="Held-out evaluation every N versions."),
         config: str = typer.Option("configs/quickstart.toml", help="Base config."),
         out: str = typer.Option("benchmarks/results/baseline-loo-cpu.md", help="Result file."),
         runs_root: str = typer.Option("runs/bench-baseline", help="Where the runs go."),
         extra: list[str] = typer.Option([], "--set", help="Extra config overrides for every run."),
         ) -> None:
    """Run both baselines with every seed and write the comparison table."""
    rows = []
    sets_common = [f"run.max_steps={steps}", f"run.eval_every={eval_every}", *extra]
    for seed in range(seeds):
        for baseline in BASELINES:
            run_dir = Path(runs_root) / f"{baseline}-seed{seed}"
            if run_dir.exists():
                subprocess.run(["rm", "-rf", str(run_dir)], check=True)
            sets = [f"algo.baseline={baseline}", f"run.seed={seed}", f"run.run_dir={run_dir}",
                    *sets_common]
            cmd = [sys.executable, "-m", "rapid_async.cli", "run", "--config", config,
                   "--actors", "1", *sum((["--set", s] for s in sets), [])]
            print(f"[bench-baseline] {baseline} seed {seed}", flush=True)
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                raise typer.Exit(1)
            row = {"baseline": baseline, "seed": seed, "wall_s": time.time() - t0,
                   "evals": evals_by_version(run_dir), **run_stats(run_dir)}
            print(f"[bench-baseline]   {row}", flush=True)
            rows.append(row)
    versions = sorted({v for r in rows for v in r["evals"]})
    command = "bin/bench-baseline " + " ".join(sys.argv[1:])
    write_table(rows, versions, Path(out), command.strip(), sets_common)
    print(f"[bench-baseline] wrote {out}")


if __name__ == "__main__":
    typer.run(main)
