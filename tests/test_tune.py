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


STEPS = 6
"""Updates per trial in the sweep test: trials stop on steps, so a slow machine
cannot leave one with none."""


def test_trial_command_stops_on_steps_when_given(tmp_path):
    from rapid_async.tune.trials import trial_command

    by_time = trial_command(None, ["actors=2"], tmp_path, 30.0, None)
    assert "run.max_seconds=30.0" in by_time and "run.max_steps=1000000" in by_time
    assert by_time[by_time.index("--actors") + 1] == "2"
    by_steps = trial_command(None, [], tmp_path, 30.0, 1, max_steps=7)
    assert "run.max_steps=7" in by_steps and "run.max_steps=1000000" not in by_steps


def test_a_trial_without_any_update_gives_a_row_of_dashes(tmp_path):
    from rapid_async.metrics import MetricsWriter
    from rapid_async.tune.sweep import table
    from rapid_async.tune.trials import summary

    writer = MetricsWriter(tmp_path, role="learner")
    writer.write({"step": 0, "eval/success": 0.25})
    writer.close()
    row = summary(tmp_path)
    assert row["steps"] == 0 and row["updates_per_s"] == 0.0
    assert row["mean_staleness"] != row["mean_staleness"]  # nan: no step, no staleness
    line = table([(["learner.max_staleness=0"], row)]).splitlines()[-1]
    assert "| 0.00 | - |" in line and "nan" not in line, line


def test_rapid_tune_sweep_writes_table_csv_json_plots_and_tensorboard(tmp_path, random_model_dir):
    root = tmp_path / "tune"
    proc = subprocess.run(
        [sys.executable, "-m", "rapid_async.cli", "tune", "sweep", "--config",
         str(REPO / "configs" / "quickstart.toml"), "--actors", "1", "--steps", str(STEPS),
         "--budget-s", "600",
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
    for row in rows:  # each trial stopped on its step count, not on the (upper-bound) budget
        assert row["updates_per_s"] > 0 and row["steps"] == STEPS and row["actors"] == 1
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
