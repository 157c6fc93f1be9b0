"""Load benchmark: many actors against one learner (`bin/bench-load`).

Starts `rapid-run` with N actors (16 by default) on the tiny model for a fixed
time, and meanwhile
- samples the learner's resident memory (RSS) every few seconds, and
- probes the learner's control socket like an actor would: a session of its
  own ("load-probe") asks for zero prompts every 50 ms and times each reply.

At the end it checks, from metrics.jsonl, that no group was lost: every group
the actors sent was received and accepted (none refused, none reissued), and
every accepted group was trained, dropped by the staleness rule (counted) or
still in the buffer at the stop (recorded as pending in the checkpoint); and
that no prompt was trained twice. Writes benchmarks/results/load-cpu.md.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import typer

from rapid_async.metrics import read_metrics

RUN = ["run.mode=rapid-async", "run.max_steps=1000000", "run.eval_every=0", "run.eval_size=50",
       "algo.group_size=4", "algo.max_new_tokens=6", "learner.minibatch_groups=8",
       "learner.buffer_groups=32", "learner.max_staleness=4", "actor.chunk_groups=2"]


class Probe(threading.Thread):
    """Times control round trips every `every_s`: a DeltaRequest from a base no
    delta starts at, which the learner answers at once with an error reply (it
    changes nothing, unlike asking for work: zero prompts means "evaluator")."""

    def __init__(self, endpoint: str, every_s: float = 0.05):
        super().__init__(daemon=True)
        from rapid_async.wire.transport import ActorSockets

        self.sockets = ActorSockets(endpoint, "load-probe")
        self.sockets.hello(os.getpid(), "none", timeout_ms=60_000)
        self.every_s = every_s
        self.rtts: list[float] = []
        self.failures = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.every_s):
            t0 = time.perf_counter()
            try:
                self.sockets.request_delta(2**62, timeout_ms=10_000)
            except RuntimeError:  # "no kept delta starts at version ...": the answer
                self.rtts.append(time.perf_counter() - t0)
            except TimeoutError:
                if self.halt.is_set():
                    break  # the run ended while we waited
                self.failures += 1
        self.sockets.close()


def _memory_sampler(pid: int, samples: list[tuple[float, int]], halt: threading.Event,
                    every_s: float = 5.0) -> None:
    proc = psutil.Process(pid)
    t0 = time.monotonic()
    while not halt.wait(every_s if samples else 0):
        try:
            samples.append((time.monotonic() - t0, proc.memory_info().rss))
        except psutil.Error:
            return


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def accounting(run_dir: Path) -> dict:
    """Groups sent, received, refused, trained, dropped; duplicates trained."""
    recs = read_metrics(run_dir)
    end = next(r for r in recs if r.get("role") == "learner" and r.get("event") == "end")
    steps = [r for r in recs if r.get("role") == "learner" and "loss/policy" in r]
    actors: dict[str, dict] = {}
    for r in recs:
        if r.get("role") == "actor" and "actor/groups" in r:
            actors[r["actor_id"]] = r
    work = [f"{p}:{g}" for r in steps
            for p, g in zip(r.get("trained/prompts", []), r.get("trained/grants", []))]
    prompts = [w.split(":")[0] for w in work]
    refused = {k: v for k, v in end.items()
               if k.startswith(("net/rollouts/dropped_", "net/rollouts/rejected_")) and v}
    return {
        "actors": len(actors), "steps": len(steps), "elapsed_s": end.get("elapsed_s"),
        "sent": sum(int(r["actor/groups"]) for r in actors.values()),
        "received": end.get("net/rollouts/groups", 0), "refused": refused,
        "accepted": end["buffer/accepted"], "consumed": end["buffer/consumed"],
        "dropped_stale": end["buffer/dropped_stale"], "left_in_buffer": end["buffer/size"],
        "reissued": end.get("scheduler/reissued", 0), "expired": end.get("net/actors/expired", 0),
        "trained_groups": len(work), "trained_twice": len(prompts) - len(set(prompts)),
        "bad_messages": end.get("net/bad_messages", 0),
        "tokens_per_s": steps[-1].get("throughput/tokens_per_s") if steps else None,
    }


def main(actors: int = typer.Option(16, help="Actors to start."),
         seconds: float = typer.Option(300.0, help="Training seconds (run.max_seconds)."),
         out: str = typer.Option("benchmarks/results/load-cpu.md", help="Result file."),
         run_dir: str = typer.Option("runs/bench-load", help="Run directory."),
         model_dir: str = typer.Option("", help="Model directory (default: a random tiny model)."),
         ) -> None:
    """Run the load test and write the result file."""
    from rapid_async.tinymodel import init_model_dir

    run_path = Path(run_dir)
    subprocess.run(["rm", "-rf", str(run_path)], check=True)
    run_path.mkdir(parents=True)
    model = model_dir or str(init_model_dir(run_path / "model", seed=0))
    sets = [*RUN, f"run.max_seconds={seconds}", f"run.run_dir={run_path}", f"model.path={model}"]
    cmd = [sys.executable, "-m", "rapid_async.cli", "run", "--actors", str(actors),
           *sum((["--set", s] for s in sets), [])]
    print(f"[bench-load] {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    launcher = subprocess.Popen(cmd, stdout=open(run_path / "bench-launcher.log", "w"),
                                stderr=subprocess.STDOUT)
    endpoint = run_path / "learner.json"
    while not endpoint.is_file():
        if launcher.poll() is not None:
            raise SystemExit(f"rapid-run exited with {launcher.returncode} before the learner "
                             f"started; see {run_path / 'bench-launcher.log'}")
        time.sleep(0.2)
    info = json.loads(endpoint.read_text())
    probe = Probe(info["control"])
    probe.start()
    samples: list[tuple[float, int]] = []
    halt = threading.Event()
    sampler = threading.Thread(target=_memory_sampler, args=(info["pid"], samples, halt), daemon=True)
    sampler.start()
    code = launcher.wait()
    halt.set()
    probe.halt.set()
    probe.join(timeout=15)
    if code != 0:
        raise SystemExit(f"rapid-run exited with {code}; see {run_path}")
    result = {**accounting(run_path), "wall_s": time.time() - t0, "rtts": probe.rtts,
              "probe_failures": probe.failures, "rss": samples}
    write_result(result, Path(out), actors, seconds)
    print(f"[bench-load] wrote {out}", flush=True)


def write_result(r: dict, out: Path, actors: int, seconds: float) -> None:
    rtt_ms = [1000 * x for x in r["rtts"]]
    rss = [b / 2**20 for _, b in r["rss"]]
    settled = [b / 2**20 for t, b in r["rss"] if t >= 60] or rss
    p99 = _percentile(rtt_ms, 0.99)
    lost = r["sent"] - r["received"]
    identity = r["accepted"] - r["consumed"] - r["dropped_stale"] - r["left_in_buffer"]
    no_loss = lost == 0 and not r["refused"] and r["reissued"] == 0 and identity == 0
    growth = max(settled) - settled[0] if settled else float("nan")
    lines = [
        f"# Load: {actors} actors, one learner, tiny model, {seconds:g} s",
        "",
        f"Command: `flock /work/heavy.lock bin/bench-load --actors {actors} --seconds {seconds:g}`",
        f"Machine: {platform.node()}, {os.cpu_count()} CPU cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM (the shared 2-core dev box unless "
        "this line says otherwise); rapid-run pins the learner to core 0 and spreads the actors "
        "over all cores, one torch thread each.",
        f"Settings: `{' '.join(RUN)}` on a randomly initialised tiny model.",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| actors that reported | {r['actors']} | {actors} |",
        f"| optimizer steps | {r['steps']} | - |",
        f"| control reply latency p50 / p90 / p99 / max (ms) | {_percentile(rtt_ms, 0.5):.1f} / "
        f"{_percentile(rtt_ms, 0.9):.1f} / {p99:.1f} / {max(rtt_ms, default=float('nan')):.1f} "
        f"({len(rtt_ms)} probes, {r['probe_failures']} failed) | p99 < 100 |",
        f"| learner RSS min / median / max (MiB) | {min(rss, default=0):.0f} / "
        f"{statistics.median(rss) if rss else 0:.0f} / {max(rss, default=0):.0f} "
        f"({len(rss)} samples) | bounded |",
        f"| learner RSS growth after the first minute (MiB) | {growth:.0f} | < 100 |",
        f"| groups sent by actors / received by the learner | {r['sent']} / {r['received']} | equal |",
        f"| refused (dropped or rejected), by reason | {r['refused'] or 0} | 0 |",
        f"| work reissued / actors taken for gone | {r['reissued']} / {r['expired']} | 0 / 0 |",
        f"| accepted = trained + dropped stale + left in buffer | {r['accepted']} = "
        f"{r['consumed']} + {r['dropped_stale']} + {r['left_in_buffer']} | holds |",
        f"| prompts trained twice | {r['trained_twice']} (of {r['trained_groups']}) | 0 |",
        f"| bad messages | {r['bad_messages']} | 0 |",
        f"| learner tokens/s | {r['tokens_per_s'] or 0:.0f} | - |",
        "",
        "Verdict: "
        f"latency p99 {'met' if p99 < 100 else 'NOT met'}; "
        f"memory {'bounded' if growth < 100 else 'NOT bounded'}; "
        f"no group lost {'met' if no_loss else 'NOT met'}; "
        f"no prompt trained twice {'met' if r['trained_twice'] == 0 else 'NOT met'}.",
        "",
        "Groups left in the buffer at the stop were accepted but not trained before the time "
        "budget ran out; the final checkpoint records their prompts as pending, so a resumed "
        "run hands them out again.",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    typer.run(main)
