"""How a run ends when something fails, with real processes: rapid-run when its
only actor is SIGKILLed, several learner ranks when every rank raises, and a
multi-rank graceful stop that takes longer than torchrun's default 30 s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, read_log
from rapid_async.metrics import read_metrics

CONFIG = REPO / "configs" / "quickstart.toml"
RUN = ["run.mode=rapid-async", "run.max_steps=100000", "run.eval_every=0", "run.eval_size=4",
       "run.checkpoint_every=0", "run.checkpoint_minutes=0", "algo.group_size=2",
       "learner.minibatch_groups=2", "learner.buffer_groups=4", "actor.chunk_groups=2",
       "algo.max_new_tokens=6"]


def rapid_run(run_dir: Path, model_dir: Path, *extra: str, overrides: list[str] = ()) -> subprocess.Popen:
    args = ["--set", f"run.run_dir={run_dir}", "--set", f"model.path={model_dir}",
            *sum((["--set", o] for o in [*RUN, *overrides]), [])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "rapid_async.cli", "run", "--config",
                             str(CONFIG), *extra, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def learner_records(run_dir: Path) -> list[dict]:
    try:
        return [r for r in read_metrics(run_dir) if r.get("role") == "learner"]
    except FileNotFoundError:
        return []


def wait_until(what: str, ready, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait for an event (`ready()` true); fail if rapid-run exits first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"rapid-run exited before {what}: {proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.2)


def stepped(run_dir: Path, step: int):
    return lambda: any(r.get("step", 0) >= step and "loss/policy" in r
                       for r in learner_records(run_dir))


def children(run_dir: Path, proc: subprocess.Popen) -> dict[str, int]:
    wait_until("children.json", (run_dir / "children.json").exists, proc)
    return json.loads((run_dir / "children.json").read_text())


def all_gone(pids) -> bool:
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        return False
    return True


@pytest.mark.slow
def test_rapid_run_whose_only_actor_is_killed_ends_with_an_end_record(tmp_path, random_model_dir):
    # Issue 21.5: the learner waited up to 300 s for the dead actor's final
    # evaluation and rapid-run killed it after 10 s, so there was no end record.
    run_dir = tmp_path / "run"
    proc = rapid_run(run_dir, random_model_dir, "--actors", "1",
                     overrides=["learner.actor_timeout_s=3", "run.eval_timeout_s=600"])
    try:
        pids = children(run_dir, proc)
        wait_until("step 2", stepped(run_dir, 2), proc)
        os.kill(pids["actor-0"], signal.SIGKILL)  # a child we started, by pid
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out[-3000:]  # documented: a child failed
    assert "actor-0" in out and "exited with code -9" in out
    assert "the learner stopped cleanly" in out, out[-3000:]
    records = learner_records(run_dir)
    ends = [r for r in records if r.get("event") == "end"]
    assert len(ends) == 1 and ends[0]["stop_reason"] == "signal SIGTERM", ends
    missing = [r for r in records if r.get("event") == "eval_missing"]
    assert [r["eval/kind"] for r in missing] == ["final"]
    assert missing[0]["reason"] == "no actor is connected"
    # Gave up after the actor timeout, far from run.eval_timeout_s (600 s).
    assert missing[0]["elapsed_s"] - max(r["elapsed_s"] for r in records
                                         if "loss/policy" in r) < 300
    saved = sorted((run_dir / "checkpoints").glob("step-*"))
    assert saved and json.loads((saved[-1] / "rapid_checkpoint.json").read_text())[
        "version"] == ends[0]["version"]
    assert "Traceback" not in read_log(run_dir / "learner.log")
    assert all_gone(pids.values())


# ---------------------------------------------------------------- several learner ranks

# Every rank's loss is NaN (a hook on the final norm), so every step is skipped
# and, at learner.max_skipped_steps, every rank raises. Rank 0 runs the real
# Learner (groups put straight into its buffer; no actor): its shut-down needs
# rank 1 for the checkpoint gather, the last publish and STOP.
DIVERGING = """
import faulthandler, json, logging, sys
faulthandler.dump_traceback_later(300, exit=True)  # a deadlock ends with every thread's stack
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
from rapid_async.config import load_config
from rapid_async.learner import distributed, trainer as trainer_module

overrides, model_dir = json.loads(sys.argv[1]), sys.argv[2]
cfg = load_config(overrides=overrides)
load_model = trainer_module.Trainer._load_model

def nan_model(self, *args, **kwargs):
    model = load_model(self, *args, **kwargs)
    model.get_decoder().norm.register_forward_hook(lambda mod, inputs, out: out * float("nan"))
    return model

trainer_module.Trainer._load_model = nan_model
if distributed.is_follower():
    distributed.run_follower(cfg, model_dir)
    sys.exit(0)
from rapid_async.learner.loop import Learner
from test_trainer import two_groups

learner = Learner(cfg, model_dir=model_dir)
for version in range(2):
    for group in two_groups():
        learner.buffer.put(group)
try:
    learner.run()
except trainer_module.TrainingDiverged as exc:
    print("rank 0 stopped:", exc, flush=True)
"""


def torchrun(script: Path, *args: str, timeout: float = 400) -> tuple[int, str]:
    """Two gloo ranks. A deadlock ends in the script's own faulthandler exit
    (the ranks run in sessions of their own); `timeout` is a last bound."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}  # this checkout's code
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node=2", str(script), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group of the torchrun we started
        out, _ = proc.communicate()
        pytest.fail(f"the ranks did not finish in {timeout} s (deadlock):\n{out[-4000:]}")
    return proc.returncode, out


@pytest.mark.slow
def test_every_rank_raising_does_not_deadlock_and_rank_0_still_checkpoints(random_model_dir,
                                                                          tmp_path):
    # Issue 16.1: followers waited in close()'s barrier while rank 0 broadcast
    # the shut-down checkpoint command.
    run_dir = tmp_path / "run"
    script = tmp_path / "diverging.py"
    script.write_text(DIVERGING)
    overrides = [f"run.run_dir={run_dir}", "learner.devices=2", "learner.max_skipped_steps=2",
                 "algo.group_size=4", "learner.minibatch_groups=2", "learner.max_staleness=8",
                 "run.max_steps=10", "run.eval_size=4", "run.eval_every=0",
                 "run.checkpoint_every=0", "run.checkpoint_minutes=0"]
    rc, out = torchrun(script, json.dumps(overrides), str(random_model_dir))
    assert rc == 0, out[-4000:]  # both ranks exited 0: rank 1 was stopped by rank 0
    assert "rank 0 stopped: 2 consecutive steps had a non-finite loss" in out
    assert "serving its last commands" in out  # rank 1 logged the error and went on
    assert "learner rank 1: stop" in out
    records = learner_records(run_dir)
    assert [r["guard/skipped"] for r in records if "guard/skipped" in r] == [1.0]
    ends = [r for r in records if r.get("event") == "end"]
    assert len(ends) == 1 and "max_skipped_steps" in ends[0]["stop_reason"]
    saved = run_dir / "checkpoints" / "step-00000000"
    assert (saved / "rapid_checkpoint.json").is_file() and (saved / "trainer_state.pt").is_file()


# Rank 0 alone fails inside a step, before its collectives, while rank 1 waits
# in them: rank 0 must not try the shut-down collectives, and rank 1 must end.
RANK_0_FAILS = DIVERGING.replace("""trainer_module.Trainer._load_model = nan_model
""", """
def out_of_memory(self, batch):
    raise MemoryError("rank 0 only")

if not distributed.is_follower():
    trainer_module.Trainer.step = out_of_memory
""").replace("except trainer_module.TrainingDiverged as exc:", "except MemoryError as exc:")


@pytest.mark.slow
def test_rank_0_failing_alone_ends_every_rank_without_a_deadlock(random_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    script = tmp_path / "rank0_fails.py"
    script.write_text(RANK_0_FAILS)
    overrides = [f"run.run_dir={run_dir}", "learner.devices=2", "algo.group_size=4",
                 "learner.minibatch_groups=2", "run.max_steps=10", "run.eval_size=4",
                 "run.eval_every=0", "run.checkpoint_every=0", "run.checkpoint_minutes=0"]
    rc, out = torchrun(script, json.dumps(overrides), str(random_model_dir))
    assert rc != 0, out[-4000:]  # rank 0's error ends the job; nothing hangs
    assert "Timeout" not in out and "faulthandler" not in out.lower(), out[-4000:]
    assert "the learner ranks are out of step" in out
    ends = [r for r in learner_records(run_dir) if r.get("event") == "end"]
    assert len(ends) == 1 and "MemoryError" in ends[0]["stop_reason"]


@pytest.mark.slow
def test_a_multi_rank_graceful_stop_longer_than_30_s_writes_its_end_record(tmp_path,
                                                                           random_model_dir):
    # Issue 16.2: torchrun SIGKILLed the ranks 30 s after the SIGTERM while rank
    # 0 waited for the final evaluation. Here that wait lasts the actor timeout
    # (40 s): the only actor is stopped (SIGSTOP) before the SIGTERM.
    run_dir = tmp_path / "run"
    proc = rapid_run(run_dir, random_model_dir, "--actors", "1", "--learner-devices", "2",
                     overrides=["learner.actor_timeout_s=40"])
    try:
        pids = children(run_dir, proc)
        wait_until("step 2", stepped(run_dir, 2), proc, timeout=400)
        os.kill(pids["actor-0"], signal.SIGSTOP)  # a child we started, by pid
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        ends = lambda: [r for r in learner_records(run_dir) if r.get("event") == "end"]
        wait_until("the end record", lambda: bool(ends()), proc, timeout=400)
        ended = time.time()
        os.kill(pids["actor-0"], signal.SIGCONT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.kill(pids["actor-0"], signal.SIGCONT)
        except (ProcessLookupError, NameError, UnboundLocalError):
            pass
    assert proc.returncode == 0, out[-3000:]
    end = ends()[0]
    assert end["stop_reason"] == "signal SIGTERM"
    assert ended - sent > 30, "the stop must outlast torchrun's default shutdown timeout"
    missing = [r for r in learner_records(run_dir) if r.get("event") == "eval_missing"]
    assert [r["eval/kind"] for r in missing] == ["final"]
    saved = sorted((run_dir / "checkpoints").glob("step-*"))
    assert json.loads((saved[-1] / "rapid_checkpoint.json").read_text())["version"] == end["version"]
    log = read_log(run_dir / "learner.log")
    assert "learner rank 1: stop" in log and "Traceback" not in log
    assert all_gone(pids.values())


def test_torchrun_gets_a_shutdown_timeout_that_covers_a_graceful_stop():
    from rapid_async.config import load_config
    from rapid_async.learner.distributed import torchrun_argv
    from rapid_async.learner.signals import STOP_MARGIN_S, stop_grace_s

    cfg = load_config(overrides=["run.eval_timeout_s=500", "learner.actor_timeout_s=45"])
    assert stop_grace_s(cfg) == STOP_MARGIN_S + 545
    argv = torchrun_argv(2, ["--config", "c.toml"], stop_grace_s(cfg))
    assert f"--shutdown-timeout={int(STOP_MARGIN_S) + 545}" in argv
    assert argv[argv.index("rapid_async.cli") + 1:] == ["learner", "--config", "c.toml"]
