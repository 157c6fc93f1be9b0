"""rapid-replay: the learner's replay record and the offline retraining that checks it.

The end-to-end test runs rapid-run (real learner and actor processes, the tiny
random model) for 24 steps, replays the record bit for bit, then perturbs one
record (a reward, then a token) and checks that the replay fails at exactly
that version and names a tensor. The task is `hashbit` (reward = a hash bit of
prompt and completion), so that a random model gets rewards that differ within
a group and every step has real gradients (on arithmetic it would score 0, and
only weight decay would move the weights).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO
from rapid_async.config import load_config
from rapid_async.learner.policy import Batch
from rapid_async.learner.replay_record import (decode_batch, encode_batch, read_meta, read_step,
                                               step_files, weight_digests, write_step)
from rapid_async.replay import first_difference, replay_run

CONFIG = REPO / "configs" / "quickstart.toml"
STEPS = 24


def small_batch() -> Batch:
    gen = torch.Generator().manual_seed(0)
    return Batch(input_ids=torch.randint(0, 30, (4, 7), generator=gen),
                 attention_mask=torch.ones(4, 7, dtype=torch.long),
                 positions=torch.arange(3, 6).repeat(4, 1), completion_ids=torch.randint(0, 30, (4, 3)),
                 mask=torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]),
                 behaviour_logprobs=-torch.rand(4, 3, generator=gen),
                 rewards=torch.tensor([0.0, 1.0, 0.5, 1.0]), policy_versions=torch.tensor([3, 3, 2, 2]),
                 group_size=2, truncated=torch.tensor([False, True, False, False]))


def test_batch_round_trips_bit_for_bit():
    batch = small_batch()
    again = decode_batch(encode_batch(batch))
    assert again.group_size == 2
    for name, value in batch.__dict__.items():
        if isinstance(value, torch.Tensor):
            assert getattr(again, name).dtype == value.dtype, name
            assert torch.equal(getattr(again, name), value), name


def test_weight_digests_name_the_changed_tensor():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    before = weight_digests(model)
    assert list(before) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    with torch.no_grad():
        model[1].weight[0, 1] = torch.nextafter(model[1].weight[0, 1], torch.tensor(9.0))  # one ulp
    after = weight_digests(model)
    assert first_difference(after, before) == ("1.weight", 1)
    assert first_difference(before, before) is None


def test_record_replay_setting_is_validated():
    with pytest.raises(ValueError, match="learner.record_replay"):
        load_config(overrides=["learner.record_replay=yes"])
    with pytest.raises(ValueError, match="needs learner.devices = 1"):
        load_config(overrides=["learner.record_replay=on", "learner.devices=2"])
    assert load_config().learner.record_replay == "auto"


def replay_cli(run_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rapid_async.cli", "replay", "--quiet", str(run_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_replay_of_a_real_run_passes_and_a_perturbed_record_fails_at_its_version(tmp_path,
                                                                                 random_model_dir):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "rapid_async.cli", "run", "--config", str(CONFIG), "--actors", "1",
         "--set", f"run.run_dir={run_dir}", "--set", f"model.path={random_model_dir}",
         "--set", f"run.max_steps={STEPS}", "--set", "run.eval_every=0", "--set", "run.eval_size=10",
         "--set", "algo.group_size=2", "--set", "learner.minibatch_groups=4",
         "--set", "learner.batch_groups=4", "--set", "learner.buffer_groups=8",
         "--set", "actor.chunk_groups=4", "--set", "task.name=hashbit"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = step_files(run_dir)
    assert len(files) == STEPS and read_meta(run_dir)["start_version"] == 0
    assert [read_step(f)["version_after"] for f in files] == list(range(1, STEPS + 1))
    rewards = [decode_batch(read_step(f)["batch"]).rewards.view(-1, 2) for f in files]
    assert sum(int((r[:, 0] != r[:, 1]).sum()) for r in rewards) > STEPS  # real advantages

    ok = replay_cli(run_dir)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert f"replayed {STEPS} steps" in ok.stdout and f"versions 0..{STEPS} match" in ok.stdout

    # Flip one reward of step 7's record: the replay diverges at version 7, not before.
    rec = read_step(files[6])
    original = dict(rec)
    batch = decode_batch(rec["batch"])
    batch.rewards[0] = 1.0 - batch.rewards[0]
    write_step(files[6], {**rec, "batch": encode_batch(batch)})
    result = replay_run(run_dir)
    assert not result.ok and result.version == 7 and result.steps == 7
    assert result.tensor in rec["digests"]
    assert result.versions == list(range(7))
    bad = replay_cli(run_dir)
    assert bad.returncode == 1
    assert "replay FAILED at version 7" in bad.stderr and f"tensor {result.tensor}" in bad.stderr

    # Restore it and change one completion token instead, in the first record from step 15
    # on with a group whose rewards differ (a row with advantage 0 has no gradient).
    write_step(files[6], original)
    k = next(i for i in range(14, STEPS) if (rewards[i][:, 0] != rewards[i][:, 1]).any())
    row = 2 * int(torch.nonzero(rewards[k][:, 0] != rewards[k][:, 1])[0])
    rec = read_step(files[k])
    batch = decode_batch(rec["batch"])
    batch.completion_ids[row, 0] = (batch.completion_ids[row, 0] + 1) % 20 + 4
    write_step(files[k], {**rec, "batch": encode_batch(batch)})
    result = replay_run(run_dir)
    assert not result.ok and result.version == k + 1 and result.tensor in rec["digests"]
    assert result.versions == list(range(k + 1))


def test_trainer_records_only_fresh_runs_and_replays_in_process(tmp_path, random_model_dir):
    from test_trainer import two_groups

    from rapid_async.config import dumps_toml
    from rapid_async.learner.trainer import Trainer

    overrides = [f"run.run_dir={tmp_path / 'run'}", "learner.lr=1e-3", "run.seed=3"]
    off = Trainer(load_config(overrides=overrides + ["learner.record_replay=off"]), random_model_dir)
    assert not off.start_replay_record() and off.replay_recorder is None
    cfg = load_config(overrides=overrides)  # auto: on for this one-rank CPU learner
    trainer = Trainer(cfg, random_model_dir)
    assert not trainer.start_replay_record(resumed=True)  # a resumed run does not record
    assert trainer.start_replay_record()
    for version in (0, 1, 0):
        m = trainer.update(two_groups(version))
        assert m["replay/bytes"] > 0
    (tmp_path / "run" / "config.toml").write_text(dumps_toml(cfg))
    assert read_meta(tmp_path / "run")["seed"] == 3
    result = replay_run(tmp_path / "run")
    assert result.ok and result.versions == [0, 1, 2, 3], result.mismatch
