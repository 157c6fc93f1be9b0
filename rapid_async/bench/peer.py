"""TRL's GRPOTrainer against rapid_async on the CPU task, side by side (`bin/bench-peer`).

In one run, seed by seed and setting by setting interleaved (so that the
load of a shared machine falls on both alike), it trains:

- TRL 1.16 GRPOTrainer, on-policy (steps_per_generation 1) and with
  steps_per_generation 4 (`rapid_async.bench.peer_trl`, one process per run);
- rapid-run with configs/quickstart.toml in modes rapid-async, rapid-sync and
  grpo (`rapid_async.bench.modes.MODE_OVERRIDES`, one learner and one actor),

all from the same warm model, on the same prompts and reward, with the same
greedy held-out evaluation, for `--seconds` of training each (by default a
run stops early once held-out success reaches the target: `--full` runs the
whole budget). Then it writes benchmarks/results/peer-cpu.md and .json
(`rapid_async.bench.peer_report`).

Clocks (both exclude TRL's held-out evaluations, which pause its training;
rapid-run's run on the actor while the learner trains):
    training clock  seconds since the first rollout began: TRL's
                    on_train_begin (its first step generates), the actor's
                    work loop start in rapid-run (after its model load and
                    first weights)
    wall clock      seconds since the driver launched the process: imports,
                    model load, rapid-run's learner and actor start-up included

A rapid-run evaluation result counts at the time its version was trained (the
step record of that version), as `bench/modes.py` does.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import typer

from rapid_async.bench.modes import MODE_OVERRIDES
from rapid_async.metrics import read_metrics

TRL_SETTINGS = ("trl-on-policy", "trl-spg4")
RAPID_SETTINGS = ("rapid-async", "rapid-sync", "grpo")
ORDER = ("trl-spg4", "rapid-async", "trl-on-policy", "rapid-sync", "grpo")
"""Run order within a seed: TRL and rapid alternate."""


# ---------------------------------------------------------------- parsing

def seconds_to_threshold(rows: list[dict], threshold: float, clock: str = "train_s") -> float | None:
    """The `clock` value of the first row (in clock order) whose success reaches
    `threshold`; None when none does."""
    for row in sorted(rows, key=lambda r: r[clock]):
        if row["success"] >= threshold:
            return row[clock]
    return None


def median_or_none(values: list[float | None]) -> float | None:
    """Median with None ("not reached") counted as +infinity; None when the
    median itself is not reached; None for no values."""
    if not values:
        return None
    m = statistics.median([float("inf") if v is None else v for v in values])
    return None if m == float("inf") else m


def rapid_rows(run_dir: Path, launched: float) -> dict[str, Any]:
    """A rapid-run's evaluation rows on both clocks, and its totals.

    Args:
        run_dir: the run directory (metrics.jsonl).
        launched: time.time() when rapid-run was started.

    Returns:
        {"rows": [{step, train_s, wall_s, success}], "steps", "tokens",
         "train_s", "wall_s", "first_rollout_wall_s"}.
    """
    recs = read_metrics(run_dir)
    actors = [r for r in recs if r.get("role") == "actor"]
    if not actors:
        raise ValueError(f"{run_dir}: no actor record in metrics.jsonl (did the actor start?)")
    first = min(r["time"] - r["elapsed_s"] for r in actors)
    learner = [r for r in recs if r.get("role") == "learner"]
    step_time = {0: first}
    for r in learner:
        if "loss/policy" in r:
            step_time[r["version"]] = r["time"]
    rows = []
    for r in learner:
        if isinstance(r.get("eval/success"), (int, float)) and r.get("event") == "eval":
            t = step_time.get(r["eval/version"])
            if t is None:  # a version no step record names (the end's final publish)
                continue
            rows.append({"step": r["eval/version"], "train_s": max(t - first, 0.0),
                         "wall_s": t - launched, "success": r["eval/success"]})
    last = max(step_time.values())
    tokens = sum(max((r.get("actor/tokens", 0) for r in actors if r["actor_id"] == a), default=0)
                 for a in {r["actor_id"] for r in actors})
    return {"rows": sorted(rows, key=lambda r: r["train_s"]), "steps": len(step_time) - 1,
            "tokens": tokens, "train_s": last - first, "wall_s": last - launched,
            "first_rollout_wall_s": first - launched, "profile": wait_profile(recs)}


LEARNER_CLOCKS = ("train_s", "learner/busy_s", "learner/wait_s", "learner/publish_s",
                  "learner/checkpoint_s")
ACTOR_CLOCKS = ("elapsed_s", "actor/gen_s", "actor/update_s", "actor/eval_s", "actor/idle_s",
                "actor/send_wait_s", "actor/busy_s", "actor/chunks", "actor/deltas")


def wait_profile(recs: list[dict[str, Any]]) -> dict[str, float]:
    """Where a rapid-run's learner and (first) actor spent their time: the
    cumulative clocks of the last step record and the actor's last record, and
    the learner's wait before its first step (the actor's start-up and first
    round), kept apart from the waits after it."""
    steps = [r for r in recs if r.get("role") == "learner" and "loss/policy" in r]
    actors = [r for r in recs if r.get("role") == "actor"]
    if not steps or not actors:
        return {}
    last, actor = steps[-1], [r for r in actors if r["actor_id"] == actors[0]["actor_id"]][-1]
    out = {k: float(last.get(k, 0.0)) for k in LEARNER_CLOCKS}
    out.update({k: float(actor.get(k, 0.0)) for k in ACTOR_CLOCKS})
    out["first_wait_s"] = float(steps[0].get("learner/wait_s", 0.0))
    out["first_train_s"] = float(steps[0].get("train_s", 0.0))
    out["steps"] = len(steps)
    return out


BUDGET_SLACK = 1.05
"""Evaluations up to 5% past the training budget count (the last step before
the budget ends, and TRL's evaluation after it, land just past it)."""


def summarise(result: dict[str, Any], target: float, budget_s: float | None = None) -> dict[str, Any]:
    """Seconds to target on both clocks, updates/s and generated tokens/s of one
    run; evaluations past the training budget (`BUDGET_SLACK`) do not count."""
    rows = [r for r in result["rows"]
            if budget_s is None or r["train_s"] <= budget_s * BUDGET_SLACK]
    train_s = result["train_s"]
    gaps = [b["train_s"] - a["train_s"] for a, b in zip(rows, rows[1:])]
    return {"setting": result["setting"], "seed": result["seed"],
            "to_target_train_s": seconds_to_threshold(rows, target, "train_s"),
            "to_target_wall_s": seconds_to_threshold(rows, target, "wall_s"),
            "start": rows[0]["success"] if rows else None,
            "best": max((r["success"] for r in rows), default=None),
            "last": rows[-1]["success"] if rows else None,
            "steps": result["steps"], "train_s": train_s,
            "updates_per_s": result["steps"] / train_s if train_s > 0 else None,
            "tokens_per_s": result["tokens"] / train_s if train_s > 0 else None,
            "eval_gap_s": statistics.median(gaps) if gaps else None,
            "load_before": result.get("load_before"), "load_after": result.get("load_after")}


# ---------------------------------------------------------------- running

def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _stream_until(proc: subprocess.Popen, hit: Any, poll_s: float = 1.0) -> bool:
    """Wait for `proc`; True as soon as `hit()` says so (the process still runs)."""
    while proc.poll() is None:
        if hit():
            return True
        time.sleep(poll_s)
    return False


def run_trl_setting(setting: str, seed: int, seconds: float, eval_every_s: float,
                    root: Path, config: str, stop_at: float | None) -> dict[str, Any]:
    """One TRL run in its own process; returns its result (peer_trl's JSON)."""
    out = root / f"{setting}-seed{seed}" / "result.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    launched = time.time()
    cmd = [sys.executable, "-m", "rapid_async.bench.peer_trl", "--setting",
           setting.removeprefix("trl-"), "--seed", str(seed), "--seconds", str(seconds),
           "--eval-every-s", str(eval_every_s), "--out", str(out), "--config", config,
           "--launched", repr(launched), "--stop-at", str(stop_at or 0.0)]
    with open(out.parent / "trl.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{setting} seed {seed} failed (exit {proc.returncode}); "
                           f"see {out.parent / 'trl.log'}")
    result = json.loads(out.read_text())
    result["setting"] = setting
    return result


def run_rapid_setting(mode: str, seed: int, seconds: float, eval_every: int, root: Path,
                      config: str, stop_at: float | None) -> dict[str, Any]:
    """One rapid-run (learner + 1 actor) in `mode`; SIGTERM (a graceful stop) once
    held-out success reaches `stop_at`. Returns its rows and totals."""
    run_dir = root / f"{mode}-seed{seed}"
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    # The learner's clock starts before the actor's start-up (~10 s); the
    # training clock at the first rollout: give the learner the difference.
    sets = MODE_OVERRIDES[mode] + [f"run.seed={seed}", f"run.max_seconds={seconds + 30}",
                                   "run.max_steps=100000", f"run.run_dir={run_dir}",
                                   f"run.eval_every={eval_every}"]
    cmd = [sys.executable, "-m", "rapid_async.cli", "run", "--config", config, "--actors", "1",
           *sum((["--set", s] for s in sets), [])]
    run_dir.mkdir(parents=True)

    def reached() -> bool:
        if stop_at is None or not (run_dir / "metrics.jsonl").exists():
            return False
        return any(r.get("event") == "eval" and r.get("eval/success", 0) >= stop_at
                   for r in read_metrics(run_dir))

    launched = time.time()
    with open(run_dir.parent / f"{mode}-seed{seed}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        if _stream_until(proc, reached):
            proc.send_signal(signal.SIGTERM)  # graceful: checkpoint, final eval, end record
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"{mode} seed {seed} failed (exit {rc}); see {log.name}")
    return {"side": "rapid", "setting": mode, "seed": seed, "run_dir": str(run_dir),
            **rapid_rows(run_dir, launched)}


def run_all(settings: list[str], seeds: int, seconds: float, eval_every_s: float,
            eval_every: int, root: Path, config: str, stop_at: float | None,
            on_result: Any = None) -> list[dict[str, Any]]:
    """Every setting for every seed, interleaved; uptime noted around each run."""
    results = []
    for seed in range(seeds):
        for setting in [s for s in ORDER if s in settings]:
            before = _uptime()
            print(f"[bench-peer] {setting} seed {seed} ({before})", flush=True)
            if setting in TRL_SETTINGS:
                result = run_trl_setting(setting, seed, seconds, eval_every_s, root, config, stop_at)
            else:
                result = run_rapid_setting(setting, seed, seconds, eval_every, root, config, stop_at)
            result["load_before"], result["load_after"] = before, _uptime()
            results.append(result)
            if on_result is not None:
                on_result(results)
    return results


def main(seeds: int = typer.Option(3, help="Seeds per setting."),
         seconds: float = typer.Option(120.0, help="Training seconds per run (budget)."),
         target: float = typer.Option(0.6, help="Held-out success to reach."),
         only: str = typer.Option("", help="trl | rapid: run one side only."),
         settings: str = typer.Option(",".join(ORDER), help="Comma-separated settings."),
         full: bool = typer.Option(False, help="Run the whole budget, not stopping at the target."),
         eval_every_s: float = typer.Option(5.0, help="TRL: evaluate every S training seconds."),
         eval_every: int = typer.Option(10, help="rapid-run: evaluate every N versions."),
         config: str = typer.Option("configs/quickstart.toml"),
         root: Path = typer.Option(Path("runs/bench-peer"), help="Where the runs go."),
         out: Path = typer.Option(Path("benchmarks/results/peer-cpu.md"), help="Result file (.md; "
                                  "the JSON goes beside it)."),
         note: str = typer.Option("", help="Machine / load note for the results file.")) -> None:
    """Train every setting with every seed, then write the comparison."""
    from rapid_async.bench.peer_report import write_report

    chosen = [s for s in settings.split(",") if s]
    unknown = set(chosen) - set(ORDER)
    if unknown:
        raise typer.BadParameter(f"unknown setting(s) {sorted(unknown)}; known: {', '.join(ORDER)}")
    if only not in ("", "trl", "rapid"):
        raise typer.BadParameter(f"--only {only!r}: use trl or rapid")
    if only:
        chosen = [s for s in chosen if (s in TRL_SETTINGS) == (only == "trl")]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = " ".join(sys.argv[1:])
    meta = {"command": f"python -m rapid_async.bench.peer {argv}".strip(), "seeds": seeds,
            "seconds": seconds, "target": target, "stop_at_target": not full,
            "eval_every_s": eval_every_s, "eval_every": eval_every, "config": config,
            "note": note, "cpus": os.cpu_count()}

    def save(results: list[dict]) -> None:  # after every run: a crash keeps what was measured
        write_report(results, meta, out)

    run_all(chosen, seeds, seconds, eval_every_s, eval_every, root, config,
            None if full else target, on_result=save)
    print(f"[bench-peer] wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    typer.run(main)
