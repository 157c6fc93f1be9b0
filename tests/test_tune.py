"""rapid-tune: grid parsing, and two real short trials compared in a table."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from rapid_async.tune import parse_grid


def test_parse_grid_is_the_cartesian_product():
    assert parse_grid(["learner.max_staleness=1,2", "algo.group_size=4"]) == [
        ["learner.max_staleness=1", "algo.group_size=4"],
        ["learner.max_staleness=2", "algo.group_size=4"],
    ]
    assert parse_grid([]) == [[]]
    with pytest.raises(ValueError, match="section.key"):
        parse_grid(["max_staleness=1"])
    with pytest.raises(ValueError, match="no values"):
        parse_grid(["learner.max_staleness="])


def test_rapid_tune_runs_trials_and_writes_a_table(tmp_path, random_model_dir):
    root = tmp_path / "tune"
    proc = subprocess.run(
        [sys.executable, "-m", "rapid_async.cli", "tune", "--config",
         str(REPO / "configs" / "quickstart.toml"), "--actors", "1", "--budget-s", "4",
         "--root", str(root), "--grid", "learner.max_staleness=0,2",
         "--set", f"model.path={random_model_dir}", "--set", "run.eval_size=10",
         "--set", "algo.group_size=2", "--set", "learner.minibatch_groups=4",
         "--set", "learner.batch_groups=4", "--set", "learner.buffer_groups=8",
         "--set", "actor.chunk_groups=4"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (root / "tune.md").read_text()
    rows = [line for line in text.splitlines() if "learner.max_staleness=" in line]
    assert len(rows) == 2
    # with max_staleness 0 no consumed group may be older than the learner
    stale0 = next(r for r in rows if "learner.max_staleness=0" in r)
    cells = [c.strip() for c in stale0.split("|")]
    assert float(cells[7]) == 0.0, stale0
    for row in rows:
        assert float(row.split("|")[2]) > 0, row  # updates per second


def test_rapid_tune_rejects_a_bad_value_before_running(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rapid_async.cli", "tune", "--root", str(tmp_path),
         "--grid", "learner.max_staleness=-1"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "learner.max_staleness" in proc.stderr
    assert not (tmp_path / "trial-0").exists()
