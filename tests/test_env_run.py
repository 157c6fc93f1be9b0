"""Environments end to end: rapid-run (real learner and actor processes) on multi-turn episodes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cli, read_log
from rapid_async.metrics import read_metrics

CONFIG = REPO / "configs" / "quickstart.toml"


def rapid_run(tmp_path: Path, sets: list[str], timeout: float = 600,
              pythonpath: Path | None = None) -> tuple[list[dict], Path]:
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "rapid_async.cli", "run", "--config", str(CONFIG),
            "--actors", "1", "--set", f"run.run_dir={run_dir}"]
    for s in sets:
        args += ["--set", s]
    path = str(REPO) if pythonpath is None else f"{REPO}:{pythonpath}"
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": path,
           "HOME": str(tmp_path), "RAPID_LEARNER_THREADS": "1"}
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    logs = out.stdout + out.stderr + "".join(
        p.read_text(errors="replace") for p in sorted(run_dir.glob("*.log")))
    assert out.returncode == 0, logs[-4000:]
    assert "Traceback" not in logs, logs[-4000:]
    return read_metrics(run_dir), run_dir


def _learner_steps(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("role") == "learner" and "loss/policy" in r]


def _no_rejections(records: list[dict]) -> None:
    rejected = {k: v for r in records for k, v in r.items()
                if "rejected_" in k and isinstance(v, (int, float)) and v}
    assert not rejected, rejected


@pytest.mark.slow
def test_reasoning_gym_multi_turn_runs_end_to_end_and_rapid_eval_plays_episodes(
        tmp_path, random_model_dir):
    """A reasoning-gym dataset in the 3-turn retry environment: the learner
    accepts and trains every multi-turn group, the actor's held-out evaluation
    plays episodes, and rapid-eval on the final checkpoint does too."""
    pytest.importorskip("reasoning_gym")
    sets = [f"model.path={random_model_dir}", "task.name=reasoning_gym",
            "task.options.dataset=basic_arithmetic", "task.options.min_terms=2",
            "task.options.max_terms=2", "task.options.max_digits=1",
            "task.options.heldout_size=8", "run.mode=rapid-async", "run.max_steps=3",
            "run.eval_every=0", "run.eval_size=4", "algo.group_size=2", "algo.max_new_tokens=4",
            "learner.batch_groups=2", "learner.minibatch_groups=2", "learner.buffer_groups=4",
            "actor.chunk_groups=2", "env.name=retry", "env.options.feedback=)", "env.max_turns=3",
            "env.max_episode_tokens=16"]
    records, run_dir = rapid_run(tmp_path, sets)
    steps = _learner_steps(records)
    assert [r["step"] for r in steps] == [1, 2, 3]
    _no_rejections(records)
    actor = [r for r in records if r.get("role") == "actor"][-1]
    # the random model is never right: every episode goes on to its 3rd turn
    assert actor["actor/env_turns"] > actor["actor/groups"] * 2
    assert actor["actor/env_tokens"] > 0
    ends = [r for r in records if r.get("event") == "end"]
    assert ends and 0.0 <= ends[-1]["eval/success"] <= 1.0
    evals = sorted((run_dir / "evals").glob("final-*.jsonl"))
    first = json.loads(evals[0].read_text().splitlines()[0])
    assert first["greedy_completion"].count("[assistant]") >= 2  # a transcript of turns
    checkpoint = sorted((run_dir / "checkpoints").iterdir())[-1]
    out = tmp_path / "eval.jsonl"
    proc = cli("eval", "--model", str(checkpoint), "--config", str(CONFIG), "--out", str(out),
               "--n", "2", *sum((["--set", s] for s in sets if not s.startswith("model.")),
                                []), log=tmp_path / "eval.log")
    assert proc.wait(timeout=300) == 0, read_log(tmp_path / "eval.log")[-3000:]
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["problems"] == 4 and "pass@2" in summary
    assert all(line.count("[assistant]") >= 2 for line in out.read_text().splitlines())


DIGITS_TASK = '''
"""A task a random tiny model can learn in minutes: answer with digits only."""
from rapid_async.tasks.arithmetic import ArithmeticTask


class DigitsTask(ArithmeticTask):
    name = "digits"

    def reward(self, problem, completion_text):
        """The share of the answer\'s characters that are digits (1.0: all are)."""
        text = (completion_text or "").strip()
        return sum(c.isdigit() for c in text) / len(text) if text else 0.0
'''


@pytest.mark.slow
def test_three_turn_retry_env_learns_on_cpu(tmp_path, random_model_dir):
    """A 3-turn environment learns through rapid-run: the retry environment
    (an answer that is not all digits gets the problem again, up to 3 model
    turns, reward of the final answer) on the random tiny model. In rapid-sync
    the first update trains on groups of the untrained policy (version 0) and
    each round's data follow from the seed and the weights alone, so the result
    does not depend on machine speed or load: the mean reward of the last 8 of
    24 updates beats the first update's (counted steps)."""
    (tmp_path / "digits_task.py").write_text(DIGITS_TASK)
    sets = [f"model.path={random_model_dir}", "task.name=digits_task:DigitsTask",
            "run.mode=rapid-sync", "run.max_steps=24", "run.eval_every=0", "run.eval_size=20",
            "algo.group_size=4", "algo.max_new_tokens=3", "learner.lr=2e-3",
            "learner.batch_groups=8", "learner.minibatch_groups=8", "learner.buffer_groups=16",
            "learner.max_staleness=2", "actor.chunk_groups=8", "env.name=retry",
            "env.options.feedback={prompt}", "env.max_turns=3", "env.max_episode_tokens=24"]
    records, _ = rapid_run(tmp_path, sets, timeout=900, pythonpath=tmp_path)
    steps = _learner_steps(records)
    assert len(steps) == 24
    _no_rejections(records)
    assert steps[0]["staleness/mean"] == 0  # version 0's groups: the untrained policy
    first = steps[0]["reward/mean"]
    last = sum(r["reward/mean"] for r in steps[-8:]) / 8
    assert last > first + 0.15, (first, last, [r["reward/mean"] for r in steps])
    actor = [r for r in records if r.get("role") == "actor"][-1]
    assert actor["actor/env_tokens"] > 0  # wrong answers were retried: multi-turn episodes
    assert actor["actor/env_turns"] > actor["actor/groups"] * 4
