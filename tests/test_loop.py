"""Tests of rapid_async.learner.loop: the Learner's steps around the trainer and
its shut-down path, in process (real sockets on loopback; no actor connects)."""

from __future__ import annotations

import json
import os
import signal

import pytest

from rapid_async.config import load_config
from rapid_async.learner.checkpoint import latest_checkpoint
from rapid_async.learner.loop import Learner
from rapid_async.metrics import read_metrics
from test_trainer import SMALL, two_groups
from rapid_async.tinymodel import init_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_model_dir(tmp_path_factory.mktemp("loop") / "model", seed=0, **SMALL)


def test_a_skipped_step_is_recorded_but_never_published(model_dir, tmp_path, one_thread):
    cfg = load_config(overrides=[f"run.run_dir={tmp_path}", "run.eval_every=1",
                                 "run.checkpoint_every=1", "run.eval_size=4", "learner.lr=1e-3"])
    learner = Learner(cfg, model_dir=str(model_dir))
    try:
        learner.t_start = 0.0
        hook = learner.trainer.model.get_decoder().norm.register_forward_hook(
            lambda mod, inputs, out: out * float("nan"))
        metrics = learner.update(two_groups())
        hook.remove()
        learner.publish(metrics, end_of_round=True)
        learner.record(metrics)
        assert metrics["guard/skipped"] == 1.0 and learner.trainer.version == 0
        assert learner.net.outbox.empty() and learner.published_version == 0
        assert learner.evals.oldest_open_version() is None, "no evaluation of a skipped step"
        assert not (tmp_path / "checkpoints").exists()
        metrics = learner.update(two_groups())
        learner.publish(metrics, end_of_round=True)
        learner.record(metrics)
        assert learner.publisher.flush(timeout=30)  # encoded in the publisher thread
        assert learner.published_version == 1 and learner.net.outbox.qsize() == 1
        learner.checkpointer.wait()  # written in the background
        assert learner.evals.find(1).kind == "periodic", "an actor is asked to evaluate v1"
        assert (tmp_path / "checkpoints").is_dir()
        records = (tmp_path / "metrics.jsonl").read_text().splitlines()
        assert '"guard/skipped": 1.0' in records[0] and '"guard/skipped_steps": 1.0' in records[1]
    finally:
        learner.publisher.close()
        learner.net.sockets.close()  # the network thread was never started


def make_learner(tmp_path, model_dir, *overrides):
    cfg = load_config(overrides=[f"run.run_dir={tmp_path / 'run'}", "run.eval_size=4",
                                 "algo.group_size=2", "run.eval_every=0", *overrides])
    return Learner(cfg, model_dir=str(model_dir))


def test_checkpoint_is_written_before_a_failing_final_evaluation(tmp_path, random_model_dir,
                                                                 one_thread, monkeypatch):
    learner = make_learner(tmp_path, random_model_dir)
    learner.start()
    learner.trainer.version = 7  # as if 7 steps were trained
    learner.scheduler.requeue([3, 5])  # granted, not trained
    learner.stop_reason = "test"

    def out_of_memory():
        raise RuntimeError("out of memory during evaluation")

    monkeypatch.setattr(learner, "final_evaluation", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        learner.shutdown()
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None and ckpt.name == "step-00000007"
    meta = json.loads((ckpt / "rapid_checkpoint.json").read_text())
    assert meta["pending"] == [3, 5] and meta["extra"] == {"stop_reason": "test"}
    end = [r for r in read_metrics(tmp_path / "run") if r.get("event") == "end"]
    assert len(end) == 1 and end[0]["stop_reason"] == "test" and end[0]["eval/success"] is None
    assert end[0]["checkpoint/version"] == 7 and not learner.net.is_alive()


def test_a_signal_stops_the_loop_after_the_current_step(tmp_path, random_model_dir, one_thread):
    learner = make_learner(tmp_path, random_model_dir)
    learner.start()
    try:
        assert signal.getsignal(signal.SIGTERM) == learner._on_signal
        assert not learner.done()
        os.kill(os.getpid(), signal.SIGTERM)  # this process, by pid: handled, not fatal
        assert learner.stop_requested == "signal SIGTERM"
        assert learner.take() == [], "waiting for data ends on a signal"
        assert learner.done() and learner.stop_reason == "signal SIGTERM"
    finally:
        learner.shutdown()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert latest_checkpoint(tmp_path / "run").name == "step-00000000"


def test_groups_dropped_stale_by_the_last_wait_are_in_the_end_record(tmp_path, random_model_dir,
                                                                      one_thread):
    # Three granted and delivered prompts are stale when the learner (at version
    # 5, max_staleness 1) waits for its next mini-batch; a signal ends that wait.
    # No step follows to list them, so the end record must, or the audit calls
    # them lost (issue 16.7).
    import dataclasses

    from rapid_async.audit import audit_run

    learner = make_learner(tmp_path, random_model_dir, "learner.max_staleness=1",
                           "learner.minibatch_groups=4", "learner.actor_timeout_s=3")
    learner.start()
    try:
        learner.trainer.version = 5
        grant = learner.scheduler.grant("a0", 3, 0, 0)
        assert grant.indices == [0, 1, 2]
        for index in grant.indices:
            assert learner.scheduler.delivered("a0", index, grant.grant_id) == "accepted"
            learner.buffer.put(dataclasses.replace(two_groups()[0], prompt_id=str(index),
                                                   grant_id=grant.grant_id, policy_version=0))
        real_take = learner.buffer.take

        def take_then_signal(*args, **kwargs):  # the signal comes during the first wait
            out = real_take(*args, **kwargs)
            learner.stop_requested = "signal SIGTERM"
            return out

        learner.buffer.take = take_then_signal
        assert learner.take() == [] and learner.buffer.dropped_stale == 3
    finally:
        learner.shutdown()
    end = [r for r in read_metrics(tmp_path / "run") if r.get("event") == "end"]
    assert len(end) == 1 and sorted(end[0]["dropped/prompts"]) == ["0", "1", "2"]
    report = audit_run(tmp_path / "run")
    assert report.problems == [] and report.dropped == {0, 1, 2} and report.data_position == 3
