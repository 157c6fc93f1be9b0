"""rapid_async.tune.measure and report: per-role costs and the report of recorded runs.

The runs are short real runs of the quickstart (tests/fixtures/tune); the
synthetic runs below check the arithmetic of the steady window by hand.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from rapid_async.metrics import MetricsWriter
from rapid_async.tune.measure import measure_run
from rapid_async.tune.report import diagnose, report_text, single_changes
from rapid_async.tune.model import Setting
from tune_fixtures import fixture_run


def write_synthetic_run(run_dir, steps: int = 10, extra: dict | None = None) -> None:
    """A learner stepping every 0.5 s (0.3 training, 0.1 publishing, 0.1 waiting)
    and one actor generating 8 groups per step in one call; `extra` (step -> dict)
    adds fields to the learner's step records."""
    (run_dir / "config.toml").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text("[learner]\nminibatch_groups = 8\nbatch_groups = 8\n")
    learner = MetricsWriter(run_dir, "learner")
    actor = MetricsWriter(run_dir, "actor")
    t0 = 1000.0
    for k in range(1, steps + 1):
        hist = {"1": 8 * k} if k < 5 else {"1": 32, "2": 8 * (k - 4)}
        rec = learner.write({"step": k, "version": k, "train_s": 0.5 * k,
                             "learner/wait_s": 0.1 * k, "learner/busy_s": 0.3 * k,
                             "learner/publish_s": 0.1 * k, "learner/eval_s": 0.0,
                             "learner/checkpoint_s": 0.0, "staleness/mean": 1.0,
                             "staleness/hist": hist, "is/truncated_frac": 0.01,
                             "is/ess_per_group": 0.9, "buffer/accepted": 10 * k,
                             "buffer/dropped_stale": 2 * k, "net/weights/published": k,
                             **((extra or {}).get(k, {}))})
        rec["time"] = t0 + 0.5 * k
        a = actor.write({"actor_id": "a0", "elapsed_s": 0.5 * k, "actor/groups": 8 * k,
                         "actor/chunks": k, "actor/gen_s": 0.2 * k, "actor/update_s": 0.05 * k,
                         "actor/deltas": k, "actor/snapshots": 0, "actor/busy_s": 0.25 * k,
                         "actor/idle_s": 0.25 * k, "actor/send_wait_s": 0.0})
        a["time"] = t0 + 0.5 * k
    # rewrite with exact times (MetricsWriter stamps the wall clock)
    import json

    lines = []
    for i, line in enumerate((run_dir / "metrics.jsonl").read_text().splitlines()):
        rec = json.loads(line)
        rec["time"] = t0 + 0.5 * (i // 2 + 1)
        lines.append(json.dumps(rec))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_steady_window_per_update_costs_by_hand(tmp_path):
    write_synthetic_run(tmp_path)
    r = measure_run(tmp_path)
    # the window starts at step 2 (20% of 10 steps, at least index 2 -> step 3)
    assert r.window_steps == 7 and r.steps == 10
    assert r.window_s == pytest.approx(3.5)
    assert r.updates_per_s == pytest.approx(2.0)
    assert r.learner["train_s"] == pytest.approx(0.3)
    assert r.learner["wait_s"] == pytest.approx(0.1)
    assert r.learner["publish_s"] == pytest.approx(0.1)
    assert r.learner["other_s"] == pytest.approx(0.0, abs=1e-9)
    assert r.publish_per_stage == pytest.approx(0.1)  # sync_every 1: one stage per step
    assert r.learner_fracs()["wait_s"] == pytest.approx(0.2)
    a = r.actors[0]
    assert a.gen_per_group == pytest.approx(0.2 / 8)
    assert a.groups_per_chunk == pytest.approx(8.0)
    assert a.apply_per_update == pytest.approx(0.05)
    assert a.busy_frac == pytest.approx(0.5)
    # histogram: the window's share only (steps 4..10: 8 at staleness 1, 48 at 2)
    assert r.staleness_hist == {1: 8, 2: 48}
    assert r.staleness_mean == pytest.approx((8 + 96) / 56)
    assert r.dropped == 14 and r.generated == 70 and r.drop_frac == pytest.approx(0.2)
    assert r.truncated_frac == pytest.approx(0.01) and r.ess_per_group == pytest.approx(0.9)
    assert "actors limit this run" in diagnose(r)[0]  # waits 20% >= 15%
    assert any("dropped as stale" in d for d in diagnose(r))


def test_too_short_or_foreign_runs_are_refused_with_a_reason(tmp_path):
    write_synthetic_run(tmp_path, steps=3)
    with pytest.raises(ValueError, match="at least 4 are needed"):
        measure_run(tmp_path)
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match="run directory"):
        measure_run(tmp_path / "other")


def test_recorded_runs_measure_what_their_settings_imply():
    base = measure_run(fixture_run("cal-base"))
    assert base.window_steps >= 10 and base.updates_per_s > 0.5
    shares = base.learner_fracs()
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["train_s"] > 0.5 and shares["wait_s"] < 0.15  # learner-bound on 2 cores
    assert 0 < base.gen_per_group < 0.05 and base.groups_per_chunk == pytest.approx(32)
    assert max(base.staleness_hist) <= 4 and base.dropped == 0
    stale0 = measure_run(fixture_run("stale0"))
    assert set(stale0.staleness_hist) == {0}  # max_staleness 0: only fresh groups trained
    assert stale0.drop_frac > 0.3 and stale0.learner_fracs()["wait_s"] > 0.15
    two = measure_run(fixture_run("two-actors"))
    assert [a.actor_id for a in two.actors] == ["actor-0", "actor-1"]
    assert all(a.groups > 0 and a.applies > 0 for a in two.actors)
    assert two.placement["children"] == {"learner": "0", "actor-0": "1", "actor-1": "0"}


def test_report_names_the_limiting_role_and_ranks_changes():
    text = report_text(fixture_run("cal-base"))
    for part in ("waiting for data", "training", "publishing", "evaluating", "checkpointing",
                 "ms/group", "ms/update", "Staleness of consumed groups", "ESS per group",
                 "dropped as stale", "The learner limits this run", "What would move it"):
        assert part in text, part
    ranked = text.split("What would move it")[1].splitlines()[1:]
    assert len(ranked) == 5
    first = ranked[0]  # the best change must be predicted to help
    gain = float(first.split("updates/s (")[1].split("%")[0])
    assert gain > 0, first
    assert "The actors limit this run" in report_text(fixture_run("stale0"))


def test_report_shows_mismatch_and_warns_when_k3_at_staleness_0_is_large(tmp_path):
    # mismatch/* exist only on steps with staleness-0 tokens (not on steps 3, 6, 9 here);
    # the report means them over the steady window's steps that have them.
    def records(k3s):
        return {k: {"mismatch/k3": k3s[k % 2], "mismatch/ratio_outside": 0.002,
                    "is/ratio_outside": 0.05, "is/ess_min_group": 0.5 + k / 100}
                for k in range(1, 11) if k % 3 != 0} | {3: {}, 6: {}, 9: {}}

    bad = tmp_path / "bad"
    write_synthetic_run(bad, extra=records({0: 0.02, 1: 0.04}))
    run = measure_run(bad)
    first = run.steps - run.window_steps + 1  # the window's first step
    assert 2 <= first <= 5
    ks = [0.02 if k % 2 == 0 else 0.04 for k in range(first, 11) if k % 3 != 0]
    assert run.mismatch_k3 == pytest.approx(sum(ks) / len(ks))
    assert run.mismatch_ratio_outside == pytest.approx(0.002)
    worst = min(k for k in range(first, 11) if k % 3 != 0)
    assert run.ess_min_group == pytest.approx(0.5 + worst / 100)  # the window's worst group
    warning = [d for d in diagnose(run) if d.startswith("Engine/trainer mismatch")]
    assert len(warning) == 1 and "algo.temperature" in warning[0]
    text = report_text(bad)
    assert "Engine/trainer mismatch at staleness 0: k3 0.0" in text
    assert f"worst group {0.5 + worst / 100:.3f}" in text and "outside [0.5, 2] 0.0500" in text
    good = tmp_path / "good"
    write_synthetic_run(good, extra=records({0: 0.001, 1: 0.002}))
    assert not any(d.startswith("Engine/trainer mismatch") for d in diagnose(measure_run(good)))
    # Old runs without the metrics: "-" in the report, no warning.
    plain = tmp_path / "plain"
    write_synthetic_run(plain)
    assert "k3 - nats/token" in report_text(plain)
    assert not any(d.startswith("Engine/trainer mismatch") for d in diagnose(measure_run(plain)))


def test_single_changes_cover_each_knob():
    labels = " ".join(label for label, _ in single_changes(Setting()))
    for knob in ("actors", "max_staleness", "sync_every", "minibatch_groups", "buffer_groups",
                 "chunk_groups"):
        assert knob in labels, knob
    gpu = [label for label, _ in single_changes(Setting(devices=8, actors=7, kind="cuda"))]
    assert any("learner.devices 1 -> 2" in label for label in gpu)


def test_rapid_tune_report_command(tmp_path):
    run = fixture_run("mb16")
    proc = subprocess.run([sys.executable, "-m", "rapid_async.cli", "tune", "report", str(run)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "updates/s" in proc.stdout and "Diagnosis:" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "rapid_async.cli", "tune", "report",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "run directory" in proc.stderr


def test_diagnosis_explains_drops_and_synchronous_modes():
    small = diagnose(measure_run(fixture_run("cal-small")))
    # buffer 32 = 4 updates of data, weights 3 versions behind (sync_every 4) > 4
    assert any("lower learner.buffer_groups to 8" in d and "sync_every = 4" in d for d in small)
    stale0 = " ".join(diagnose(measure_run(fixture_run("stale0"))))
    assert "raise learner.max_staleness" in stale0 and "buffer_groups to" not in stale0
    sync = diagnose(measure_run(fixture_run("sync-mode")))
    assert sync[0].startswith("The roles take turns (run.mode = rapid-sync)")
