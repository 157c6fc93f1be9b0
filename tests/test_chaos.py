"""Chaos: a rapid-async run on CPU while actors are SIGKILLed at random times,
new ones start, and the learner is SIGKILLed once and resumed.

Real processes on loopback (`python -m rapid_async.cli learner|actor`), the
tiny random model. A seeded schedule kills a random actor every few seconds
and starts a replacement, and once, after the first checkpoint, kills the
learner and starts it again with --resume. The checks come from what the run
leaves behind (`rapid_async.audit`: metrics.jsonl and the final checkpoint):
the run finishes; the final lineage trains each version once and each prompt
(hence each (prompt, grant)) at most once; no prompt is lost other than by the
staleness rule (counted); every trained group came from weights whose checksum
the learner served for its version and the actor verified.
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

from conftest import REPO, cli, read_log, stop, wait_for_file
from rapid_async.audit import audit_run
from rapid_async.metrics import read_metrics

CONFIG = REPO / "configs" / "quickstart.toml"
STEPS = 160
KILL_LEARNER_AT = 40
# Actors are killed when the learner reaches these steps (whether they are
# working or still loading), so that the number of kills does not depend on
# how fast this machine trains; none after 40% of the run (95 steps left),
# so that every replacement has loaded and joined before the learner finishes.
# (240 steps took 277 s on the loaded 2-core box; 160 do the same checks.)
KILL_ACTOR_AT = (10, 20, 45, 55, 60, 65)
RUN = ["run.mode=rapid-async", f"run.max_steps={STEPS}", "run.checkpoint_every=10",
       "run.checkpoint_minutes=0", "run.eval_every=0", "run.eval_size=10", "algo.group_size=2",
       "algo.max_new_tokens=4", "learner.minibatch_groups=2", "learner.buffer_groups=8",
       "learner.max_staleness=2", "actor.chunk_groups=2", "actor.learner_timeout_s=3",
       "learner.actor_timeout_s=6"]


def _learner_step(run_dir: Path) -> int:
    try:
        recs = read_metrics(run_dir)
    except FileNotFoundError:
        return 0
    return max((r["version"] for r in recs if r["role"] == "learner" and "trained/prompts" in r),
               default=0)


class Chaos:
    """Starts and kills the run's processes (only those it started, by pid)."""

    def __init__(self, tmp_path: Path, model_dir: Path):
        self.tmp, self.run_dir = tmp_path, tmp_path / "run"
        self.args = ["learner", "--config", str(CONFIG), "--model-dir", str(model_dir),
                     "--set", f"run.run_dir={self.run_dir}",
                     *sum((["--set", o] for o in RUN), [])]
        self.learners: list = []
        self.actors: dict[str, object] = {}
        self.all: list = []
        self.n_actors = 0
        self.log: list[str] = []

    def start_learner(self, resume: bool) -> None:
        n = len(self.learners)
        proc = cli(*self.args, *(["--resume"] if resume else []), log=self.tmp / f"learner{n}.log")
        self.learners.append(proc)
        self.all.append(proc)
        deadline = time.monotonic() + 120
        while (info := wait_for_file(self.run_dir / "learner.json", proc))["pid"] != proc.pid:
            assert time.monotonic() < deadline and proc.poll() is None, "no learner.json"
            time.sleep(0.2)
        self.endpoint = info["control"]
        self.log.append(f"learner {n} started (resume={resume})")

    def start_actor(self) -> None:
        name = f"actor{self.n_actors}"
        self.n_actors += 1
        proc = cli("actor", "--learner", self.endpoint, "--actor-id", name,
                   log=self.tmp / f"{name}.log")
        self.actors[name] = proc
        self.all.append(proc)

    def kill_actor(self, rng: random.Random) -> None:
        """SIGKILL a random actor."""
        name = rng.choice(sorted(self.actors))
        proc = self.actors.pop(name)
        proc.send_signal(signal.SIGKILL)  # a child we started, by pid
        proc.wait()
        self.log.append(f"killed {name} at step {_learner_step(self.run_dir)}")

    def kill_learner(self) -> None:
        learner = self.learners[-1]
        learner.send_signal(signal.SIGKILL)
        learner.wait()
        self.log.append(f"killed the learner at step {_learner_step(self.run_dir)}")


def test_chaos_kills_and_restarts_lose_nothing_and_train_nothing_twice(tmp_path, random_model_dir):
    rng = random.Random(1234)
    chaos = Chaos(tmp_path, random_model_dir)
    chaos.start_learner(resume=False)
    try:
        for _ in range(2):
            chaos.start_actor()
        deadline = time.monotonic() + 900  # a hang, not a speed: 160 steps take ~3 min loaded
        learner_killed = False
        kills = list(KILL_ACTOR_AT)
        while chaos.learners[-1].poll() is None:
            assert time.monotonic() < deadline, "\n".join(chaos.log)
            time.sleep(rng.uniform(0.1, 0.4))
            step = _learner_step(chaos.run_dir)
            if not learner_killed and step >= KILL_LEARNER_AT and chaos.learners[-1].poll() is None:
                chaos.kill_learner()
                learner_killed = True
                chaos.start_learner(resume=True)
                continue
            if kills and step >= kills[0] and chaos.learners[-1].poll() is None:
                kills.pop(0)
                chaos.kill_actor(rng)
                chaos.start_actor()
        assert chaos.learners[-1].wait() == 0, read_log(tmp_path / "learner1.log")[-3000:]
        for proc in chaos.actors.values():
            assert proc.wait(timeout=60) == 0
    finally:
        for proc in chaos.all:
            stop(proc)
    history = "\n".join(chaos.log)
    assert learner_killed and sum("killed actor" in line for line in chaos.log) == len(KILL_ACTOR_AT), history
    report = audit_run(chaos.run_dir)
    assert report.problems == [], (report.problems, history)
    assert report.resumes == 1 and sorted(report.versions) == list(range(1, STEPS + 1))
    assert len(report.trained) == 2 * STEPS
    records = read_metrics(chaos.run_dir)
    end = [r for r in records if r.get("event") == "end"]
    assert len(end) == 1 and end[0]["stop_reason"] == "done"
    rejoined = [r for r in records if r["role"] == "actor" and r.get("actor/rejoins", 0) >= 1]
    assert rejoined, "actors that outlived the learner found the restarted one"
    print(json.dumps({"history": chaos.log, "dropped_stale": len(report.dropped),
                      "pending_at_end": len(report.pending)}, indent=1))
