"""Tests of rapid_async.learner.trainer: one update, atomic checkpoints, resume."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rapid_async.config import load_config
from rapid_async.wire.protocol import RolloutGroup
from rapid_async.tinymodel import init_model_dir
from rapid_async.learner.trainer import Trainer, latest_checkpoint

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2}


def make_group(prompt, completions, rewards, version=0):
    """A RolloutGroup with behaviour log-probs of -0.5 per real token."""
    k, t = len(completions), max(len(c) for c in completions)
    ids = torch.zeros((k, t), dtype=torch.int32)
    lps = torch.zeros((k, t), dtype=torch.float32)
    for i, c in enumerate(completions):
        ids[i, :len(c)] = torch.tensor(c, dtype=torch.int32)
        lps[i, :len(c)] = -0.5
    return RolloutGroup(
        actor_id="a0", prompt_id=str(prompt), policy_version=version,
        prompt_ids=torch.tensor(prompt, dtype=torch.int32), completion_ids=ids,
        completion_lengths=torch.tensor([len(c) for c in completions], dtype=torch.int32),
        logprobs=lps, rewards=torch.tensor(rewards, dtype=torch.float32),
        gen_seconds=0.0, created_at=0.0, info={})


def two_groups(version=0):
    # Token ids 4..13 are the digits of the tiny vocabulary, 2 is <eos>, 1 <bos>.
    return [make_group([1, 5, 14, 6, 19], [[7, 2], [8, 9, 2], [5], [11, 12, 13, 2]],
                       [1.0, 0.0, 0.0, 1.0], version),
            make_group([1, 9, 15, 4, 19], [[4, 2], [13, 2], [6, 6, 2], [10]],
                       [0.0, 1.0, 0.5, 0.0], version)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small random tiny-model directory (faster updates than the default size)."""
    return init_model_dir(tmp_path_factory.mktemp("trainer") / "model", seed=0, **SMALL)


@pytest.fixture
def cfg():
    return load_config(overrides=["learner.lr=1e-3", "algo.group_size=4", "run.seed=0"])


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_update_changes_weights_and_increments_version(cfg, model_dir):
    trainer = Trainer(cfg, model_dir)
    before = weights(trainer.model)
    m = trainer.update(two_groups())
    assert trainer.version == 1
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2
    assert torch.isfinite(torch.tensor(m["grad/norm"])) and m["grad/norm"] > 0
    assert m["reward/mean"] == pytest.approx((1 + 0 + 0 + 1 + 0 + 1 + 0.5 + 0) / 8)
    assert m["staleness/mean"] == 0 and m["staleness/max"] == 0
    assert m["batch/tokens"] == 2 + 3 + 1 + 4 + 2 + 2 + 3 + 1
    # Groups generated at version 0, consumed at version 1: staleness 1.
    m = trainer.update(two_groups(version=0))
    assert trainer.version == 2 and m["staleness/mean"] == 1 and m["staleness/max"] == 1


def test_grpo_with_kl_keeps_a_frozen_reference(model_dir):
    cfg = load_config(overrides=["algo.loss=grpo", "algo.beta=0.04", "learner.lr=1e-3"])
    trainer = Trainer(cfg, model_dir)
    ref = weights(trainer.ref_model)
    trainer.update(two_groups())
    assert all(torch.equal(v, ref[k]) for k, v in trainer.ref_model.state_dict().items())
    assert not all(torch.equal(v, ref[k]) for k, v in trainer.model.state_dict().items())


def test_checkpoint_round_trip_is_bit_exact(cfg, model_dir, tmp_path):
    trainer = Trainer(cfg, model_dir)
    trainer.update(two_groups())
    trainer.data_position = 17
    path = trainer.save_checkpoint(tmp_path, extra={"stop_reason": "test"})
    assert path == tmp_path / "checkpoints" / "step-00000001"
    assert json.loads((path / "rapid_checkpoint.json").read_text()) == \
        {"version": 1, "data_position": 17}
    assert not list(path.parent.glob(".tmp-*"))

    fresh = Trainer(cfg, model_dir)
    saved = weights(trainer.model)
    assert not all(torch.equal(v, saved[k]) for k, v in fresh.model.state_dict().items())
    assert fresh.load_checkpoint(path) == {"stop_reason": "test"}
    assert fresh.version == 1 and fresh.data_position == 17
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
    first = trainer.save_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path) == first
    # A crash mid-write leaves a .tmp-* directory; a half-copied one lacks the marker.
    tmp = tmp_path / "checkpoints" / ".tmp-step-00000099-12345"
    tmp.mkdir()
    (tmp / "rapid_checkpoint.json").write_text('{"version": 99, "data_position": 0}')
    (tmp_path / "checkpoints" / "step-00000050").mkdir()
    assert latest_checkpoint(tmp_path) == first
    trainer.update(two_groups(version=1))
    second = trainer.save_checkpoint(tmp_path)
    assert second.name == "step-00000002" and latest_checkpoint(tmp_path) == second
    # Saving the same version again replaces the directory in place.
    assert trainer.save_checkpoint(tmp_path) == second


def test_checkpoint_is_a_hugging_face_model_dir(cfg, model_dir, tmp_path):
    trainer = Trainer(cfg, model_dir)
    trainer.update(two_groups())
    path = trainer.save_checkpoint(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.pad_token_id == trainer.pad_id
    expected = trainer.model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
