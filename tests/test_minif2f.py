"""MiniF2F: the Lean contract, tested with a stand-in for `lean` (no toolchain here)."""

from __future__ import annotations

import sys
import textwrap

import pytest

from rapid_async.tasks.base import get_task
from rapid_async.tasks.minif2f import MiniF2FTask, proof_source

FAKE_LEAN = textwrap.dedent('''
    """Stand-in for `lean FILE`: accepts a proof that ends with `norm_num`,
    sleeps on `decide`, reports an error otherwise; records the files it saw."""
    import pathlib, sys, time
    source = pathlib.Path(sys.argv[1]).read_text()
    pathlib.Path("seen.txt").open("a").write(sys.argv[1] + "\\n")
    assert source.startswith("import Mathlib"), "header missing"
    if "decide" in source:
        time.sleep(60)
    if source.rstrip().endswith("norm_num"):
        sys.exit(0)
    print(f"{sys.argv[1]}:5:2: error: unsolved goals")
    sys.exit(1)
''')


@pytest.fixture
def task(tmp_path, shared_data):
    project = tmp_path / "project"
    project.mkdir()
    (project / "fake_lean.py").write_text(FAKE_LEAN)
    return MiniF2FTask(lean_project=str(project),
                       lean_command=f"{sys.executable} fake_lean.py {{file}}",
                       path=str(shared_data / "minif2f" / "minif2f_lean4.jsonl"), timeout_s=3)


def test_refuses_to_start_without_a_toolchain(shared_data, tmp_path):
    path = str(shared_data / "minif2f" / "minif2f_lean4.jsonl")
    with pytest.raises(ValueError, match="needs a Lean 4 toolchain.*No lean_project is set"):
        get_task("minif2f", {"path": path})
    with pytest.raises(ValueError, match="not an executable on PATH"):
        MiniF2FTask(lean_project=str(tmp_path), lean_command="no-such-lean {file}", path=path)
    with pytest.raises(ValueError, match="is not a directory"):
        MiniF2FTask(lean_project=str(tmp_path / "missing"), path=path)


def test_splits_and_prompt(task):
    assert (task.train_size, task.heldout_size) == (244, 244)
    p = task.heldout(1)[0]
    assert p.prompt_id.startswith("test/") and "import Mathlib" in p.prompt
    assert p.meta["statement"].endswith(":= by") and p.meta["statement"] in p.prompt


def test_lean_verdict_is_the_reward(task):
    p = task.heldout(1)[0]
    tactics = "```lean4\n  norm_num\n```"
    whole = f"```lean4\n{p.meta['header']}{p.meta['statement']}\n  norm_num\n```"
    wrong = "```lean4\n  simp\n```"
    rewards = task.score_batch([p] * 3, [tactics, whole, wrong])
    assert rewards == [1.0, 1.0, 0.0]
    seen = (task.project / "seen.txt").read_text().split()
    assert len(seen) == 3 and all(".rapid_tmp/Check_" in s for s in seen)
    assert list((task.project / ".rapid_tmp").iterdir()) == []  # files removed


def test_refused_without_running_lean(task):
    p = task.heldout(1)[0]
    other = task.heldout(2)[1]
    texts = ["  sorry", "  norm_num\n#eval IO.println 1\n  norm_num", "axiom cheat : False\n  norm_num",
             f"```lean4\n{other.meta['statement'].replace(other.meta['name'], p.meta['name'])}\n  norm_num\n```",
             "", None]
    assert task.score_batch([p] * len(texts), texts) == [0.0] * len(texts)
    assert not (task.project / "seen.txt").exists()
    assert proof_source(p, "  norm_num").startswith(p.meta["header"] + p.meta["statement"])


def test_timeout_scores_zero(task):
    assert task.reward(task.heldout(1)[0], "  decide\n  norm_num") == 0.0


def test_rapid_run_refuses_to_start_without_a_toolchain(shared_data, tmp_path):
    """The launcher builds the task before any child: the message comes first."""
    import os
    import subprocess

    from conftest import REPO

    args = [sys.executable, "-m", "rapid_async.cli", "run", "--actors", "1",
            "--set", "task.name=minif2f", "--set", f"run.run_dir={tmp_path / 'run'}"]
    out = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAPID_DATA": str(shared_data), "PYTHONPATH": str(REPO)})
    assert out.returncode == 2
    assert "needs a Lean 4 toolchain" in out.stderr and "lean_project" in out.stderr
    assert not (tmp_path / "run" / "learner.log").exists()
