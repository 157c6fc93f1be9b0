"""rapid-tune sweep: grid parsing, and two real short trials compared in a table, CSV,
JSON and plots (with the TensorBoard backend on)."""

from __future__ import annotations

import csv
import json
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
    assert parse_grid(["actors=1,2"]) == [["actors=1"], ["actors=2"]]
    with pytest.raises(ValueError, match="section.key"):
        parse_grid(["max_staleness=1"])
    with pytest.raises(ValueError, match="no values"):
        parse_grid(["learner.max_staleness="])


def test_rapid_tune_sweep_writes_table_csv_json_plots_and_tensorboard(tmp_path, random_model_dir):
    root = tmp_path / "tune"
    proc = subprocess.run(
        [sys.executable, "-m", "rapid_async.cli", "tune", "sweep", "--config",
         str(REPO / "configs" / "quickstart.toml"), "--actors", "1", "--budget-s", "4",
         "--root", str(root), "--grid", "learner.max_staleness=0,2",
         "--set", f"model.path={random_model_dir}", "--set", "run.eval_size=10",
         "--set", "algo.group_size=2", "--set", "learner.minibatch_groups=4",
         "--set", "learner.batch_groups=4", "--set", "learner.buffer_groups=8",
         "--set", "actor.chunk_groups=4", "--set", "metrics.backends=tensorboard"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((root / "tune.json").read_text())
    assert [r["trial"] for r in rows] == [["learner.max_staleness=0"], ["learner.max_staleness=2"]]
    # with max_staleness 0 no consumed group may be older than the learner
    assert rows[0]["mean_staleness"] == 0.0
    for row in rows:
        assert row["updates_per_s"] > 0 and row["steps"] >= 1 and row["actors"] == 1
    with open(root / "tune.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["trial"] for r in table] == ["learner.max_staleness=0", "learner.max_staleness=2"]
    assert float(table[1]["updates_per_s"]) == pytest.approx(rows[1]["updates_per_s"])
    md = (root / "tune.md").read_text()
    assert sum("learner.max_staleness=" in line for line in md.splitlines()) == 2
    for png in ("sweep.png", "rewards.png"):
        data = (root / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
    # metrics.backends = tensorboard: learner and actor wrote event files with scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    learner = EventAccumulator(str(root / "trial-1" / "tensorboard" / "learner")).Reload()
    assert "loss/policy" in learner.Tags()["scalars"]
    assert learner.Scalars("learner/busy_s")[-1].step >= 1
    actor = EventAccumulator(str(root / "trial-1" / "tensorboard" / "actor-0")).Reload()
    assert actor.Scalars("actor/groups")[-1].value > 0


def test_rapid_tune_rejects_a_bad_value_before_running(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rapid_async.cli", "tune", "--root", str(tmp_path),
         "--grid", "learner.max_staleness=-1"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "learner.max_staleness" in proc.stderr
    assert not (tmp_path / "trial-0").exists()
