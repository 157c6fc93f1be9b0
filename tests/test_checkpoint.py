"""Tests of rapid_async.learner.checkpoint: atomic, background, rotated, resumable."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from rapid_async.config import load_config
from rapid_async.learner import checkpoint
from rapid_async.learner.checkpoint import Checkpointer, latest_checkpoint
from rapid_async.learner.trainer import Trainer
from test_trainer import SMALL, two_groups
from rapid_async.tinymodel import init_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_model_dir(tmp_path_factory.mktemp("ckpt") / "model", seed=0, **SMALL)


@pytest.fixture
def cfg():
    return load_config(overrides=["learner.lr=1e-3", "algo.group_size=4", "run.seed=0"])


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save(trainer, run_dir, pending=(), meta=None):
    return checkpoint.write(checkpoint.capture(trainer, list(pending), meta), run_dir,
                            trainer.model, trainer.tokenizer)


def test_round_trip_is_bit_exact_with_rng_and_pending(cfg, model_dir, tmp_path):
    trainer = Trainer(cfg, model_dir)
    trainer.update(two_groups())
    trainer.data_position = 17
    random.seed(5)
    torch.manual_seed(6)
    path = save(trainer, tmp_path, pending=[12, 3, 9], meta={"extra": {"stop_reason": "test"}})
    assert path == tmp_path / "checkpoints" / "step-00000001"
    meta = json.loads((path / "rapid_checkpoint.json").read_text())
    assert meta == {"version": 1, "data_position": 17, "pending": [3, 9, 12],
                    "extra": {"stop_reason": "test"}}
    assert not list(path.parent.glob(".tmp-*"))
    expected_py, expected_torch = random.random(), torch.rand(3)

    fresh = Trainer(cfg, model_dir)
    saved = weights(trainer.model)
    assert not all(torch.equal(v, saved[k]) for k, v in fresh.model.state_dict().items())
    random.seed(0)
    torch.manual_seed(0)
    loaded = checkpoint.load(fresh, path)
    assert loaded["pending"] == [3, 9, 12] and loaded["extra"] == {"stop_reason": "test"}
    assert fresh.version == 1 and fresh.data_position == 17
    assert random.random() == expected_py and torch.equal(torch.rand(3), expected_torch)
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    # Optimizer moments are restored too: the next update is identical.
    trainer.update(two_groups(version=1))
    fresh.update(two_groups(version=1))
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(v, trainer.model.state_dict()[k]), k


def test_latest_checkpoint_ignores_temporary_and_incomplete(cfg, model_dir, tmp_path):
    assert latest_checkpoint(tmp_path) is None
    trainer = Trainer(cfg, model_dir)
    trainer.update(two_groups())
    first = save(trainer, tmp_path)
    assert latest_checkpoint(tmp_path) == first
    # A crash mid-write leaves a .tmp-* directory; a half-copied one lacks the marker.
    tmp = tmp_path / "checkpoints" / ".tmp-step-00000099-12345"
    tmp.mkdir()
    (tmp / "rapid_checkpoint.json").write_text('{"version": 99, "data_position": 0}')
    (tmp_path / "checkpoints" / "step-00000050").mkdir()
    assert latest_checkpoint(tmp_path) == first
    trainer.update(two_groups(version=1))
    second = save(trainer, tmp_path)
    assert second.name == "step-00000002" and latest_checkpoint(tmp_path) == second
    # Saving the same version again replaces the directory in place.
    assert save(trainer, tmp_path) == second
    # A new writer removes what a killed one left half-written.
    Checkpointer(tmp_path, every_steps=1, every_minutes=0, keep=5)
    assert not tmp.exists() and latest_checkpoint(tmp_path) == second


def test_checkpoint_is_a_hugging_face_model_dir_with_tied_weights_once(cfg, model_dir, tmp_path):
    trainer = Trainer(cfg, model_dir)
    trainer.update(two_groups())
    path = save(trainer, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.pad_token_id == trainer.pad_id
    expected = trainer.model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert trainer.model.config.tie_word_embeddings
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys


def test_background_save_is_a_consistent_copy_and_rotates(cfg, model_dir, tmp_path):
    trainer = Trainer(cfg, model_dir)
    ckpt = Checkpointer(tmp_path, every_steps=1, every_minutes=0, keep=2)
    versions = {}
    for step in range(1, 5):
        trainer.update(two_groups(version=step - 1))
        assert ckpt.due(trainer.version) or ckpt.busy()
        ckpt.wait()
        versions[trainer.version] = weights(trainer.model)
        blocked = ckpt.save(trainer, pending=[step], meta={"step": step})
        assert blocked >= 0
    # The next update changes the weights while the last write may still run:
    # the checkpoint holds the copy taken at save time.
    trainer.update(two_groups(version=4))
    ckpt.wait()
    ckpt.check()
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == ["step-00000003", "step-00000004"], "only the newest K = 2 are kept"
    fresh = Trainer(cfg, model_dir)
    meta = checkpoint.load(fresh, latest_checkpoint(tmp_path))
    assert meta["pending"] == [4] and meta["step"] == 4
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(v, versions[4][k]), k
    assert ckpt.stats["checkpoint/saved"] == 4 and ckpt.stats["checkpoint/version"] == 4


def test_due_every_n_steps_and_every_m_minutes(tmp_path, monkeypatch):
    def saves(ckpt, versions):
        out = []
        for v in versions:
            if ckpt.due(v):
                out.append(v)
                ckpt.last_version = v  # what save() records
        return out

    by_steps = Checkpointer(tmp_path, every_steps=3, every_minutes=0, keep=1)
    assert saves(by_steps, range(1, 10)) == [3, 6, 9]
    late = Checkpointer(tmp_path, every_steps=3, every_minutes=0, keep=1)
    late._thread = type("Busy", (), {"is_alive": lambda self: True})()
    assert not late.due(3), "no new checkpoint while the writer is busy"
    late._thread = None
    assert saves(late, range(4, 10)) == [4, 6, 9], "a deferred one is written at once"
    off = Checkpointer(tmp_path, every_steps=0, every_minutes=0, keep=1)
    assert not any(off.due(v) for v in range(1, 100))
    by_time = Checkpointer(tmp_path, every_steps=0, every_minutes=2, keep=1)
    assert not by_time.due(1)
    now = time.monotonic()
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: now + 121)
    assert by_time.due(1)


def test_writer_failure_is_raised_in_the_training_loop(cfg, model_dir, tmp_path):
    trainer = Trainer(cfg, model_dir)
    (tmp_path / "checkpoints").write_text("a file where the directory should be")
    ckpt = Checkpointer(tmp_path, every_steps=1, every_minutes=0, keep=1)
    ckpt.save(trainer, pending=[])
    ckpt.wait()
    with pytest.raises(RuntimeError, match="writing a checkpoint failed"):
        ckpt.check()


def test_resume_takes_hyperparameters_from_the_config(model_dir, tmp_path):
    old = load_config(overrides=["learner.lr=1e-3", "learner.weight_decay=0.0"])
    trainer = Trainer(old, model_dir)
    trainer.update(two_groups())
    path = save(trainer, tmp_path, meta={"config": old.to_dict()})
    new = load_config(overrides=["learner.lr=1e-6", "learner.weight_decay=0.1",
                                 "learner.max_staleness=2"])
    fresh = Trainer(new, model_dir)
    meta = checkpoint.load(fresh, path)
    assert fresh.optimizer.param_groups[0]["lr"] == 1e-3, "the optimizer state carries the old lr"
    changed = checkpoint.apply_hyperparameters(fresh.optimizer, new)
    assert changed == {"learner.lr": [1e-3, 1e-6], "learner.weight_decay": [0.0, 0.1]}
    assert all(g["lr"] == 1e-6 and g["weight_decay"] == 0.1
               for g in fresh.optimizer.param_groups)
    diff = checkpoint.config_changes(meta["config"], new.to_dict())
    assert diff["learner.lr"] == [1e-3, 1e-6] and diff["learner.max_staleness"] == [4, 2]
    assert "learner.grad_clip" not in diff
