"""Crash safety of rapid_async.learner.checkpoint: a process rewriting the
checkpoint of a version that already has one is SIGKILLed at every file-system
step of the write (each file opened, after its first bytes, each safetensors
and torch file, each rename, each unlink and rmdir of the old copy); after each
kill a complete checkpoint of that version exists, loads, and holds exactly
the old or the new state, and `recover` leaves nothing half-written behind."""

from __future__ import annotations

import builtins
import dataclasses
import io
import os
import shutil
import signal
import time

import pytest
import torch

from rapid_async.config import load_config
from rapid_async.learner import checkpoint
from rapid_async.learner.trainer import Trainer
from rapid_async.tinymodel import init_model_dir
from test_trainer import SMALL, two_groups

VERSION = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir = init_model_dir(tmp_path_factory.mktemp("crash") / "model", seed=0, **SMALL)
    trainer = Trainer(load_config(overrides=["learner.lr=1e-2", "algo.group_size=4"]), model_dir)
    old = checkpoint.capture(trainer, [1, 2], {"extra": {"which": "old"}})
    trainer.update(two_groups())
    new = checkpoint.capture(trainer, [3], {"extra": {"which": "new"}})
    old = dataclasses.replace(old, version=VERSION)
    new = dataclasses.replace(new, version=VERSION)
    return trainer, old, new


def _hooked_write(snapshot, run_dir, trainer, kill_at: int, report: int) -> None:
    """In the forked child: count every file-system step of `checkpoint.write`;
    at step `kill_at` report it on the pipe and wait to be killed (0: never;
    then report the total)."""
    import transformers.modeling_utils as mu

    count = [0]

    def hit(label: str) -> None:
        count[0] += 1
        if count[0] == kill_at:
            os.write(report, f"{count[0]} {label}\n".encode())
            while True:
                time.sleep(60)

    def before(fn, label):
        def wrapped(*a, **k):
            hit(f"{label} {a[0] if a else ''}")
            return fn(*a, **k)
        return wrapped

    def around(fn, label):
        def wrapped(*a, **k):
            hit(f"before {label}")
            out = fn(*a, **k)
            hit(f"after {label}")
            return out
        return wrapped

    real_open = builtins.open

    def opener(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        if not any(c in mode for c in "wax+"):
            return f
        hit(f"opened {file}")
        write, first = f.write, [True]

        def partial_write(data):  # a file cut after its first bytes
            out = write(data)
            if first[0]:
                first[0] = False
                f.flush()
                hit(f"first bytes of {file}")
            return out
        try:
            f.write = partial_write
        except AttributeError:
            pass
        return f

    builtins.open = io.open = opener
    mu.safe_save_file = around(mu.safe_save_file, "safetensors")
    torch.save = around(torch.save, "torch.save")
    os.replace = around(os.replace, "rename")
    os.unlink = before(os.unlink, "unlink")
    os.rmdir = before(os.rmdir, "rmdir")
    checkpoint.write(snapshot, run_dir, trainer.model, trainer.tokenizer)
    if not kill_at:
        os.write(report, f"total {count[0]}\n".encode())


def _run_child(snapshot, run_dir, trainer, kill_at: int) -> str:
    """Fork a writer; SIGKILL it at step `kill_at` (a real process, killed by pid)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(r)
        code = 0
        try:
            _hooked_write(snapshot, run_dir, trainer, kill_at, w)
        except BaseException:
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as pipe:
        line = pipe.readline().strip()  # blocks until the child reports
    if kill_at:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert line, f"the writer exited ({status}) before step {kill_at}"
    if kill_at:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    else:
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    return line


def _assert_one_complete_copy(trainer, run_dir, old, new, where: str) -> str:
    done = checkpoint.recover(run_dir)
    root = checkpoint.checkpoint_root(run_dir)
    assert sorted(p.name for p in root.iterdir()) == [f"step-{VERSION:08d}"], (where, done)
    path = checkpoint.latest_checkpoint(run_dir)
    assert path is not None and path.name == f"step-{VERSION:08d}", where
    meta = checkpoint.load(trainer, path)
    which = meta["extra"]["which"]
    expected = {"old": old, "new": new}[which]
    assert meta["version"] == VERSION and meta["pending"] == expected.pending, where
    state = trainer.model.state_dict()
    for name, tensor in expected.model_state.items():
        assert torch.equal(state[name], tensor), (where, which, name)
    return which


def test_a_rewrite_killed_at_any_step_leaves_one_complete_checkpoint(setup, tmp_path, one_thread):
    trainer, old, new = setup
    run_dir = tmp_path / "run"
    checkpoint.write(old, run_dir, trainer.model, trainer.tokenizer)
    total = int(_run_child(new, run_dir, trainer, 0).split()[1])
    assert _assert_one_complete_copy(trainer, run_dir, old, new, "no kill") == "new"
    assert total >= 20, total  # files, their first bytes, renames, unlinks of the old copy
    seen = {"old": 0, "new": 0}
    for kill_at in range(1, total + 1):
        shutil.rmtree(run_dir)
        checkpoint.write(old, run_dir, trainer.model, trainer.tokenizer)
        where = _run_child(new, run_dir, trainer, kill_at)
        seen[_assert_one_complete_copy(trainer, run_dir, old, new, where)] += 1
    # Killed before the new copy is renamed in: the old one stays (or comes back);
    # after it: the new one. Both happen, and every kill was survived.
    print("kills", total, seen)
    assert seen["old"] >= 1 and seen["new"] >= 1 and sum(seen.values()) == total, seen
