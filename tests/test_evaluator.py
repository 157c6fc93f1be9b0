"""Tests for rapid_async.actor.evaluator: actors evaluating for the learner,
end to end with real processes (learner, a generating actor, an evaluator)."""

from __future__ import annotations

import time

from conftest import REPO, cli, read_log, stop, wait_for_file
from rapid_async.metrics import read_metrics

CONFIG = REPO / "configs" / "quickstart.toml"


def test_a_dedicated_evaluator_does_every_evaluation_and_training_goes_on(
        tmp_path, random_model_dir):
    run_dir = tmp_path / "run"
    overrides = [f"run.run_dir={run_dir}", "run.mode=rapid-async", "run.max_steps=12",
                 "run.eval_every=4", "run.eval_size=20", "algo.group_size=2",
                 "algo.max_new_tokens=4", "learner.minibatch_groups=2",
                 "learner.batch_groups=2", "learner.buffer_groups=4", "actor.chunk_groups=2"]
    learner = cli("learner", "--config", str(CONFIG), "--model-dir", str(random_model_dir),
                  *sum((["--set", o] for o in overrides), []), log=tmp_path / "learner.log")
    procs = [learner]
    try:
        info = wait_for_file(run_dir / "learner.json", learner)
        # the evaluator first, and running (it writes its first record after
        # 2 s in its loop), so that every evaluation is handed to it
        procs.append(cli("actor", "--learner", info["control"], "--actor-id", "ev",
                         "--evaluator", log=tmp_path / "ev.log"))
        deadline = time.monotonic() + 120
        while not any(r.get("actor_id") == "ev" for r in _records(run_dir)):
            assert time.monotonic() < deadline and procs[1].poll() is None
            time.sleep(0.2)
        procs.append(cli("actor", "--learner", info["control"], "--actor-id", "gen",
                         log=tmp_path / "gen.log"))
        assert learner.wait(timeout=300) == 0, read_log(tmp_path / "learner.log")[-3000:]
        for p in procs[1:]:
            assert p.wait(timeout=60) == 0, read_log(tmp_path / "ev.log")[-3000:]
    finally:
        for p in procs:
            stop(p)
    recs = read_metrics(run_dir)
    evals = [r for r in recs if r.get("event") == "eval"]
    kinds = [r["eval/kind"] for r in evals]
    assert kinds[0] == "start" and "periodic" in kinds
    assert evals[-1]["eval/version"] == 12, "the last version is evaluated"
    versions = [r["eval/version"] for r in evals]
    assert versions == sorted(versions) and all(
        r["eval/version"] >= r["eval/requested_version"] for r in evals)
    assert {r["eval/actor"] for r in evals} == {"ev"}
    steps = [r for r in recs if r.get("role") == "learner" and "loss/policy" in r]
    assert [r["version"] for r in steps] == list(range(1, 13))
    ev = [r for r in recs if r.get("actor_id") == "ev"]
    gen = [r for r in recs if r.get("actor_id") == "gen"]
    assert ev[-1]["actor/groups"] == 0 and ev[-1]["actor/evals"] >= len(evals) - 1
    assert gen[-1]["actor/groups"] > 0
    assert list((run_dir / "evals").glob("periodic-v*-ev.jsonl")), "per-problem records"


def _records(run_dir) -> list[dict]:
    try:
        return read_metrics(run_dir)
    except FileNotFoundError:
        return []
