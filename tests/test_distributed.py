"""Tests of rapid_async.learner.distributed: two learner ranks (torchrun, FSDP2, gloo)
train exactly like one rank on the same data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import REPO, cli, read_log, stop
from rapid_async.config import load_config
from rapid_async.learner import checkpoint
from rapid_async.learner.policy import load_batch
from rapid_async.learner.trainer import Trainer
from rapid_async.tinymodel import init_model_dir
from test_trainer import SMALL, six_groups

# Rank 0 trains on three mini-batches (6, 5 and 1 groups: the last leaves rank 1
# without a group, so it makes padding passes) and saves what it would publish.
SCRIPT = """
import json, sys
from pathlib import Path
from safetensors.torch import save_file
from rapid_async.config import load_config
from rapid_async.learner import checkpoint, distributed
from rapid_async.learner.trainer import Trainer
from test_trainer import six_groups

overrides, model_dir, out = json.loads(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
cfg = load_config(overrides=overrides)
if distributed.is_follower():
    distributed.run_follower(cfg, model_dir)
    sys.exit(0)
trainer = Trainer(cfg, model_dir)
for step, n in enumerate((6, 5, 1)):
    metrics = trainer.update(six_groups(version=step)[:n])
    save_file(trainer.inference_state(), str(out / f"state-{step}.safetensors"))
    (out / f"metrics-{step}.json").write_text(json.dumps(metrics))
checkpoint.write(checkpoint.capture(trainer, pending=[]), out, trainer.model, trainer.tokenizer)
trainer.close()
"""

STEPS = (6, 5, 1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_model_dir(tmp_path_factory.mktemp("dist") / "model", seed=0, **SMALL)


def torchrun(script: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",  # this checkout's code, not an editable install's
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", str(script), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("overrides", [
    ["algo.aggregation=token-mean", "learner.micro_batch_tokens=40"],
    ["algo.loss=grpo", "algo.beta=0.04", "learner.micro_batch_tokens=0"],
], ids=["rapid-token-mean-microbatches", "grpo-kl-one-pass"])
def test_two_ranks_equal_one_rank_after_every_step(model_dir, tmp_path, overrides, one_thread):
    overrides = ["learner.lr=1e-3", *overrides]
    script = tmp_path / "two_ranks.py"
    script.write_text(SCRIPT)
    proc = torchrun(script, json.dumps(overrides), str(model_dir), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = Trainer(load_config(overrides=overrides), model_dir)
    for step, n in enumerate(STEPS):
        metrics = one.update(six_groups(version=step)[:n])
        two = json.loads((tmp_path / f"metrics-{step}.json").read_text())
        assert two["loss/total"] == pytest.approx(metrics["loss/total"], abs=1e-6)
        assert two["grad/norm"] == pytest.approx(metrics["grad/norm"], rel=1e-5)
        state = load_file(str(tmp_path / f"state-{step}.safetensors"))
        expected = one.inference_state()
        assert state.keys() == expected.keys()
        for k, v in expected.items():
            torch.testing.assert_close(state[k], v, atol=2e-6, rtol=1e-5, msg=k)
    # The checkpoint holds the full weights and the optimizer state, written by rank 0.
    ckpt = tmp_path / "checkpoints" / "step-00000003"
    saved = AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    for k, v in one.model.state_dict().items():
        torch.testing.assert_close(saved[k], v, atol=2e-6, rtol=1e-5, msg=k)
    optimizer = torch.load(ckpt / "trainer_state.pt", weights_only=True)["optimizer"]
    exp_avg = optimizer["state"]["model.embed_tokens.weight"]["exp_avg"]
    one_avg = one.optimizer.state[one.model.get_input_embeddings().weight]["exp_avg"]
    torch.testing.assert_close(exp_avg, one_avg, atol=1e-7, rtol=1e-5)
    # Resuming it (on one rank) is refused with a clear message, not a key error.
    with pytest.raises(ValueError, match="several learner ranks"):
        checkpoint.load(Trainer(load_config(overrides=overrides), model_dir), ckpt)


def test_rapid_run_with_two_learner_ranks_and_an_actor(random_model_dir, tmp_path):
    # rapid-run --learner-devices 2: torchrun with 2 gloo ranks + 1 actor, 4 steps, a
    # checkpoint after each. Replaying the recorded mini-batches on one rank gives the
    # same weights after every step.
    run_dir = tmp_path / "run"
    overrides = [f"run.run_dir={run_dir}", "run.max_steps=4", "run.checkpoint_every=1", "run.keep_checkpoints=10",
                 "run.eval_every=0", "run.eval_size=8", "learner.lr=1e-3",
                 "learner.batch_groups=4", "learner.minibatch_groups=4",
                 "learner.buffer_groups=8", "learner.micro_batch_tokens=64",
                 "learner.record_batches=true", "actor.chunk_groups=4", "algo.max_new_tokens=6",
                 "model.path=" + str(random_model_dir)]
    args = ["run", "--learner-devices", "2", "--actors", "1"]
    for o in overrides:
        args += ["--set", o]
    proc = cli(*args, log=tmp_path / "run.log")
    try:
        proc.wait(timeout=400)
    finally:
        stop(proc)
    learner_log = read_log(run_dir / "learner.log")
    assert proc.returncode == 0, read_log(tmp_path / "run.log")[-2000:] + learner_log[-3000:]
    assert "learner rank 1 of 2" in learner_log
    batches = sorted((run_dir / "batches").glob("batch-*.safetensors"))
    assert len(batches) >= 4
    one = Trainer(load_config(overrides=overrides + ["learner.record_batches=false"]),
                  random_model_dir)
    for step, path in enumerate(batches[:4], start=1):
        one.step(load_batch(path))
        saved = AutoModelForCausalLM.from_pretrained(
            run_dir / "checkpoints" / f"step-{step:08d}").state_dict()
        for k, v in one.model.state_dict().items():
            torch.testing.assert_close(saved[k], v, atol=2e-6, rtol=1e-5, msg=f"step {step} {k}")
