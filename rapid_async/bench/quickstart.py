"""How much does the quickstart depend on the CPU? (`bin/bench-quickstart`)

Floating point differs between CPUs (vector widths, BLAS kernels, thread
counts). The warm start now ships with the package (rapid_async/assets/), so
every machine starts RL from the same weights; what still differs is the RL
part. This benchmark simulates other CPUs on one machine: each variant runs
the quickstart's RL part (`rapid-run --config configs/quickstart.toml`, 200
updates) from the shipped model in a fresh process with torch's generic
(non-AVX) kernels and MKL's SSE4.2 code path, or another seed (sampling and
data order), and the table in benchmarks/results/quickstart-cpu.md gives
held-out success before and after per variant and the band (min-max).
`--rebuild-warm` also rebuilds each variant's warm start in that process first
(what a machine without the shipped model would do).

Used from the command line only; heavy (minutes per variant): run it under
the shared lock on the 2-core machine: flock /work/heavy.lock bin/bench-quickstart
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import typer

REPO = Path(__file__).resolve().parents[2]
VARIANTS = {
    "as configured": {"threads": 2, "env": {}},
    "generic kernels, MKL SSE4.2": {
        "threads": 2, "env": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "SSE4_2"}},
    "seed 1": {"threads": 2, "env": {}, "seed": 1},
    "seed 2": {"threads": 2, "env": {}, "seed": 2},
}
"""Simulated CPUs: what changes the floating point (or the sampling and data order)."""
_RESULT = re.compile(r"held-out success: before ([0-9.]+) \(version \d+\), after ([0-9.]+) "
                     r"\(version (\d+)\)")


def build(name: str, variant: dict, out: Path) -> dict:
    """Build one variant's warm start in a fresh process; return its warm_start.json."""
    code = ("import sys; from rapid_async.warmstart import warm_start; "
            "warm_start(sys.argv[1], threads=int(sys.argv[2]), seed=int(sys.argv[3]))")
    env = {**os.environ, "PYTHONPATH": str(REPO), **variant["env"]}
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-c", code, str(out), str(variant["threads"]),
                        str(variant.get("seed", 0))], env=env, stdout=f, stderr=subprocess.STDOUT,
                       check=True, cwd=REPO)
    return json.loads((out / "warm_start.json").read_text())


def rl(model: Path, run_dir: Path, extra: list[str], env_extra: dict | None = None) -> dict:
    """The quickstart's RL part from `model`; held-out success before and after, wall time."""
    cmd = [sys.executable, "-m", "rapid_async.cli", "run", "--config",
           str(REPO / "configs" / "quickstart.toml"), "--set", f"run.run_dir={run_dir}",
           "--set", f"model.path={model}"]
    for item in extra:
        cmd += ["--set", item]
    if run_dir.exists():  # a fresh run, never a resumed one
        shutil.rmtree(run_dir)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAPID_NO_VLLM": "1", **(env_extra or {})}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.monotonic() - t0
    (run_dir.parent / f"{run_dir.name}.log").write_text(proc.stdout + proc.stderr)
    found = _RESULT.search(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"the RL run from {model} failed (exit {proc.returncode}); "
                           f"see {run_dir}.log")
    return {"before": float(found.group(1)), "after": float(found.group(2)),
            "version": int(found.group(3)), "wall_s": round(wall)}


def report(rows: list[dict], machine: str) -> str:
    """The markdown of benchmarks/results/quickstart-cpu.md."""
    lines = ["# The quickstart on simulated CPUs", "",
             f"Machine: {machine}. Command: `flock /work/heavy.lock bin/bench-quickstart`.", "",
             "Each row: the quickstart's RL part (rapid-async, 200 updates) in a fresh process "
             "with what changes the floating point (or the sampling and data order) on another "
             "machine, from the warm start shipped in rapid_async/assets/ (or, marked rebuilt, "
             "one trained in that process until greedy success on the 500 held-out problems "
             "reached the recipe's target). Before and after are the run's own evaluations "
             "(the first 200 held-out problems, greedy).", "",
             "| variant | warm-start steps | success at the stop (500) | warm start s "
             "| RL: before -> after (200) | RL wall s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        w, q = r["warm"], r["rl"]
        lines.append(f"| {r['name']} | {w['steps_taken']} | {w['checks'][-1][1]:.3f} | "
                     f"{w['train_seconds']:.0f} | {q['before']:.3f} -> {q['after']:.3f} | "
                     f"{q['wall_s']} |")
    if rows:
        before = [r["rl"]["before"] for r in rows]
        after = [r["rl"]["after"] for r in rows]
        lines += ["", f"Band over {len(rows)} runs: held-out success before RL "
                  f"{min(before):.3f}-{max(before):.3f}, after {min(after):.3f}-{max(after):.3f}."]
    return "\n".join(lines) + "\n"


def main(variants: list[str] = typer.Option(list(VARIANTS), "--variant", help="Variants to run."),
         rebuild_warm: bool = typer.Option(False, help="Rebuild each variant's warm start too."),
         root: Path = typer.Option(Path("runs/bench-quickstart"), help="Where models and runs go."),
         out: Path = typer.Option(REPO / "benchmarks" / "results" / "quickstart-cpu.md"),
         machine: str = typer.Option("2-core dev box, loaded", help="Says where it ran."),
         set_: list[str] = typer.Option([], "--set", help="Overrides of the RL runs.")) -> None:
    """Warm start and RL on each simulated CPU; write the table."""
    rows = []
    for i, name in enumerate(variants):
        if name not in VARIANTS:
            raise typer.BadParameter(f"unknown variant {name!r}; known: {list(VARIANTS)}")
        variant = VARIANTS[name]
        if rebuild_warm:
            model = (root / f"warm-{i}").resolve()
            print(f"[bench-quickstart] {name}: warm start", flush=True)
            warm = build(name, variant, model)
        else:
            from rapid_async.warmstart import ensure_warm_model

            model = ensure_warm_model()
            warm = json.loads((model / "warm_start.json").read_text())
        print(f"[bench-quickstart] {name}: warm start {warm['steps_taken']} steps, "
              f"{warm['checks'][-1][1]:.3f}; RL", flush=True)
        seed = [f"run.seed={variant['seed']}"] if "seed" in variant else []
        run = rl(model, (root / f"rl-{i}").resolve(), [*seed, *set_], variant["env"])
        rows.append({"name": name + (" (rebuilt)" if rebuild_warm else ""), "warm": warm,
                     "rl": run})
        print(f"[bench-quickstart] {rows[-1]['rl']}", flush=True)
        out.write_text(report(rows, machine))
    print(f"[bench-quickstart] wrote {out}")


if __name__ == "__main__":
    typer.run(main)
