"""Benchmark of the three modes on the CPU task (`bin/bench-modes`).

Runs `rapid-run` (one learner, one actor, each pinned to its own core) for
grpo, rapid-sync and rapid-async with the same training-time budget and
several seeds, then writes a markdown table to
benchmarks/results/modes-cpu.md: time to reach a target held-out success,
final success, generated tokens/s, learner and actor busy %.

Time is training time (`train_s`: wall time minus the learner's held-out
evaluations, which every mode pays alike).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import typer

from rapid_async.metrics import read_metrics

MODE_OVERRIDES = {
    "grpo": ["run.mode=grpo", "algo.loss=grpo", "algo.beta=0.04", "learner.batch_groups=32",
             "learner.minibatch_groups=32"],
    "rapid-sync": ["run.mode=rapid-sync", "learner.batch_groups=128", "learner.minibatch_groups=32"],
    "rapid-async": ["run.mode=rapid-async", "learner.batch_groups=32", "learner.minibatch_groups=32",
                    "learner.buffer_groups=96", "actor.chunk_groups=32",
                    "learner.max_staleness=4", "learner.sync_every=1"],
}
# rapid-async with in-flight weight updates (actor.inflight: new weights
# between decode steps, per-token versions, staleness of the oldest token).
MODE_OVERRIDES["rapid-async-inflight"] = MODE_OVERRIDES["rapid-async"] + ["actor.inflight=true"]


def summarise(run_dir: Path, target: float) -> dict:
    recs = read_metrics(run_dir)
    learner = [r for r in recs if r.get("role") == "learner"]
    # A result is timed at the training time of the version it evaluated (it
    # arrives later from an actor); older runs recorded it on the step itself.
    evals = sorted((r.get("eval/train_s", r.get("train_s", r.get("elapsed_s", 0.0))),
                    r["eval/success"]) for r in learner
                   if isinstance(r.get("eval/success"), (int, float)))
    steps = [r for r in learner if "loss/policy" in r]
    actors = [r for r in recs if r.get("role") == "actor"]
    last_actor = actors[-1] if actors else {}
    reached = next((t for t, s in evals if s >= target), None)
    train_s = steps[-1]["train_s"] if steps else float("nan")
    return {
        "start": evals[0][1] if evals else float("nan"),
        "final": evals[-1][1] if evals else float("nan"),
        "best": max(s for _, s in evals) if evals else float("nan"),
        "time_to_target": reached,
        "steps": len(steps),
        "train_s": train_s,
        "gen_tokens_per_s": (last_actor.get("actor/tokens", 0) / train_s) if steps else float("nan"),
        "learner_busy": steps[-1]["learner/busy_frac"] if steps else float("nan"),
        "actor_busy": last_actor.get("actor/busy_frac", float("nan")),
        "mean_staleness": (sum(r["staleness/mean"] for r in steps) / len(steps)) if steps else float("nan"),
        "staleness_hist": steps[-1].get("staleness/hist", {}) if steps else {},
        "mixed_frac": (sum(r.get("trained/mixed_version_groups", 0) for r in steps)
                       / max(1, sum(len(r.get("trained/prompts", [])) for r in steps))),
        "inflight_updates": last_actor.get("actor/inflight_updates", 0),
    }


def _fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else format(v, spec)


def main(seeds: int = typer.Option(3, help="Seeds per mode."),
         budget_s: float = typer.Option(180.0, help="Training seconds per run."),
         target: float = typer.Option(0.6, help="Held-out success to reach."),
         config: str = typer.Option("configs/quickstart.toml", help="Base config."),
         out: str = typer.Option("benchmarks/results/modes-cpu.md", help="Result file."),
         runs_root: str = typer.Option("runs/bench-modes", help="Where the runs go."),
         modes: str = typer.Option("grpo,rapid-sync,rapid-async", help="Comma-separated modes."),
         extra: list[str] = typer.Option([], "--set", help="Extra config overrides for every run."),
         ) -> None:
    """Run every mode with every seed and write the comparison table."""
    rows = []
    for mode in modes.split(","):
        for seed in range(seeds):
            run_dir = Path(runs_root) / f"{mode}-seed{seed}"
            if run_dir.exists():
                subprocess.run(["rm", "-rf", str(run_dir)], check=True)
            sets = MODE_OVERRIDES[mode] + [
                f"run.seed={seed}", f"run.max_seconds={budget_s}", "run.max_steps=100000",
                f"run.run_dir={run_dir}", *extra]
            cmd = [sys.executable, "-m", "rapid_async.cli", "run", "--config", config,
                   "--actors", "1", *sum((["--set", s] for s in sets), [])]
            print(f"[bench-modes] {mode} seed {seed}: {' '.join(cmd[2:])}", flush=True)
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                raise typer.Exit(1)
            row = {"mode": mode, "seed": seed, "wall_s": time.time() - t0,
                   **summarise(run_dir, target)}
            print(f"[bench-modes]   {row}", flush=True)
            rows.append(row)
    write_table(rows, Path(out), target, budget_s, seeds, extra, config)
    print(f"[bench-modes] wrote {out}")


def write_table(rows: list[dict], out: Path, target: float, budget_s: float, seeds: int,
                extra: list[str], config: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Modes on the CPU task (tiny model, 2-digit arithmetic)",
        "",
        f"Command: `bin/bench-modes --seeds {seeds} --budget-s {budget_s:g} --target {target:g}"
        + "".join(f" --set {e}" for e in extra) + "`",
        f"Base config: `{config}`; one learner and one actor, each pinned to its own core; "
        f"{budget_s:g} s of training per run. Time = training time (wall time minus "
        "held-out evaluations).",
        "",
        "## Per run",
        "",
        "| mode | seed | start | final | best | time to target (s) | steps | gen tok/s | learner busy | actor busy | mean staleness |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['seed']} | {_fmt(r['start'], '.3f')} | {_fmt(r['final'], '.3f')} | "
            f"{_fmt(r['best'], '.3f')} | {_fmt(r['time_to_target'], '.0f')} | {r['steps']} | "
            f"{_fmt(r['gen_tokens_per_s'], '.0f')} | {_fmt(r['learner_busy'], '.0%')} | "
            f"{_fmt(r['actor_busy'], '.0%')} | {_fmt(r['mean_staleness'], '.2f')} |")
    lines += ["", "## Mean over seeds", "",
              "| mode | final | time to target (s) | runs reaching target | gen tok/s | learner busy | actor busy |",
              "|---|---|---|---|---|---|---|"]
    summary = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        rs = [r for r in rows if r["mode"] == mode]
        times = [r["time_to_target"] for r in rs if r["time_to_target"] is not None]
        # runs that never reach the target count with the full budget (a lower bound)
        ttt = statistics.mean([r["time_to_target"] if r["time_to_target"] is not None
                               else r["train_s"] for r in rs])
        summary[mode] = {"final": statistics.mean(r["final"] for r in rs), "ttt": ttt,
                         "reached": len(times), "n": len(rs)}
        lines.append(
            f"| {mode} | {summary[mode]['final']:.3f} | {ttt:.0f} | {len(times)}/{len(rs)} | "
            f"{statistics.mean(r['gen_tokens_per_s'] for r in rs):.0f} | "
            f"{statistics.mean(r['learner_busy'] for r in rs):.0%} | "
            f"{statistics.mean(r['actor_busy'] for r in rs):.0%} |")
    lines += _inflight_section(rows)
    lines += ["", "## Targets", ""]
    if {"grpo", "rapid-sync", "rapid-async"} <= summary.keys():
        g, s, a = summary["grpo"], summary["rapid-sync"], summary["rapid-async"]
        sync_gain = 1 - s["ttt"] / g["ttt"]
        async_speedup = s["ttt"] / a["ttt"]
        a_rows = [r for r in rows if r["mode"] == "rapid-async"]
        busy_ok = all(r["learner_busy"] >= 0.9 and r["actor_busy"] >= 0.9 for r in a_rows)
        lines += [
            f"- rapid-sync needs at least 25% less time than grpo: {sync_gain:+.0%} "
            f"-> {'met' if sync_gain >= 0.25 else 'NOT met'}",
            f"- rapid-async at least 1.6x faster than rapid-sync: {async_speedup:.2f}x "
            f"-> {'met' if async_speedup >= 1.6 else 'NOT met'}",
            f"- both roles busy >= 90% in rapid-async: {'met' if busy_ok else 'NOT met'}",
            f"- final success no more than 2 points below grpo: rapid-sync "
            f"{100 * (s['final'] - g['final']):+.1f}, rapid-async {100 * (a['final'] - g['final']):+.1f} "
            f"points -> {'met' if min(s['final'], a['final']) >= g['final'] - 0.02 else 'NOT met'}",
        ]
    out.write_text("\n".join(lines) + "\n")


def _hist(hist: dict) -> str:
    total = max(1, sum(hist.values()))
    return ", ".join(f"{k}: {v / total:.0%}" for k, v in sorted(hist.items(), key=lambda kv: int(kv[0])))


def _inflight_section(rows: list[dict]) -> list[str]:
    """rapid-async with and without in-flight updates: actor idle, staleness, time to target."""
    pair = [m for m in ("rapid-async", "rapid-async-inflight") if any(r["mode"] == m for r in rows)]
    if len(pair) < 2:
        return []
    lines = ["", "## In-flight weight updates (rapid-async)", "",
             "Staleness of a group is its oldest token's; the histogram is of the groups "
             "consumed by each run (all seeds summed).", "",
             "| mode | actor idle | time to target (s, mean) | mean staleness | staleness histogram "
             "| groups spanning versions | in-flight updates per run |",
             "|---|---|---|---|---|---|---|"]
    for mode in pair:
        rs = [r for r in rows if r["mode"] == mode]
        hist: dict = {}
        for r in rs:
            for k, v in r["staleness_hist"].items():
                hist[k] = hist.get(k, 0) + v
        ttt = statistics.mean(r["time_to_target"] if r["time_to_target"] is not None
                              else r["train_s"] for r in rs)
        lines.append(
            f"| {mode} | {statistics.mean(1 - r['actor_busy'] for r in rs):.0%} | {ttt:.1f} | "
            f"{statistics.mean(r['mean_staleness'] for r in rs):.2f} | {_hist(hist)} | "
            f"{statistics.mean(r['mixed_frac'] for r in rs):.0%} | "
            f"{statistics.mean(r['inflight_updates'] for r in rs):.0f} |")
    return lines


if __name__ == "__main__":
    typer.run(main)
