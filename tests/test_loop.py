"""Tests of rapid_async.learner.loop: the Learner's steps around the trainer."""

from __future__ import annotations

import pytest
from rapid_async.config import load_config
from rapid_async.learner.loop import Learner
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
        assert "eval/success" not in metrics and not (tmp_path / "checkpoints").exists()
        metrics = learner.update(two_groups())
        learner.publish(metrics, end_of_round=True)
        learner.record(metrics)
        assert learner.published_version == 1 and learner.net.outbox.qsize() == 1
        assert metrics["eval/version"] == 1 and (tmp_path / "checkpoints").is_dir()
        records = (tmp_path / "metrics.jsonl").read_text().splitlines()
        assert '"guard/skipped": 1.0' in records[0] and '"guard/skipped_steps": 1.0' in records[1]
    finally:
        learner.net.sockets.close()  # the network thread was never started
