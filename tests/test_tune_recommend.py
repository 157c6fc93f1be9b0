"""rapid_async.tune.recommend: search space, the choice rule, the TOML, and one real
recommend with tiny trials (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pytest

from conftest import REPO
from rapid_async.config import load_config
from rapid_async.tune.model import Costs, Prediction, Setting, predict
from rapid_async.tune.recommend import (Rules, calibration_settings, choose, search,
                                        search_space, write_toml)


def pred(updates: float, staleness: float = 1.0, drop: float = 0.0, truncated: float = 0.0,
         **setting) -> Prediction:
    return Prediction(Setting(**setting), updates, {"wait": 0.0}, 0.5, {},
                      {round(staleness): 1} if staleness == round(staleness) else {0: 1, 2: 1},
                      drop, 1.0, truncated, 1.0)


def test_choose_takes_the_fastest_allowed_setting():
    rules = Rules(max_mean_staleness=3.0, max_truncated=0.05, max_dropped=0.2)
    fast_but_stale = pred(10.0, staleness=4, minibatch_groups=8)
    fast_but_wasteful = pred(9.0, drop=0.5, minibatch_groups=8, actors=2)
    fast_but_biased = pred(8.5, truncated=0.1, minibatch_groups=8, actors=3)
    ok = pred(8.0, staleness=2, minibatch_groups=8, sync_every=2)
    slow = pred(4.0, staleness=1, minibatch_groups=32)
    assert choose([fast_but_stale, fast_but_wasteful, fast_but_biased, ok, slow], rules) is ok
    assert choose([fast_but_stale], rules) is None
    # a near tie (within 3%) goes to the lower staleness, then fewer actors
    fresher = pred(7.9, staleness=1, minibatch_groups=8, actors=2)
    assert choose([ok, fresher], rules) is fresher
    assert choose([ok, fresher], Rules(within=0.0)) is ok


def test_search_space_respects_the_floor_and_the_livelock_rule():
    base = Setting(minibatch_groups=32, batch_groups=32, devices=2)
    space = search_space(base, Rules())
    assert base in space
    assert min(s.minibatch_groups for s in space) == 8  # a quarter of 32
    assert max(s.actors for s in space) == 3
    assert all(s.sync_every <= s.max_staleness + 1 for s in space)
    assert all(s.buffer_groups >= s.minibatch_groups for s in space)
    small = search_space(base, Rules(min_minibatch_groups=16, max_actors=1))
    assert {s.minibatch_groups for s in small} == {16, 32, 64} and {s.actors for s in small} == {1}
    sync = search_space(Setting(mode="rapid-sync", batch_groups=128, minibatch_groups=32), Rules())
    assert {s.mode for s in sync} == {"rapid-sync"}
    assert all(s.batch_groups % s.minibatch_groups == 0 for s in sync)


def test_calibration_trials_measure_two_sizes():
    (_, base), (_, small) = calibration_settings(Setting())
    assert base == Setting()
    assert (small.minibatch_groups, small.chunk_groups, small.buffer_groups) == (8, 8, 32)
    assert small.sync_every > base.sync_every  # publish and apply costs at a second span
    assert small.sync_every <= small.max_staleness + 1


def test_search_prefers_small_batches_and_rare_publishing_when_the_learner_limits():
    # the quickstart's shape: training 10 ms/group, publishing 65 ms, fast actors
    c = Costs(train_per_group=0.01, gen_per_group=0.004, publish=0.065, apply=0.035)
    base = Setting()
    chosen, compared = search(c, base, Rules())
    assert compared > 100
    assert chosen.updates_per_s > 2 * predict(c, base).updates_per_s
    assert chosen.setting.minibatch_groups == 8 and chosen.setting.sync_every > 1
    assert chosen.staleness_mean <= 3.0 and chosen.drop_frac <= 0.2


def test_write_toml_is_a_loadable_config_with_the_prediction(tmp_path):
    c = Costs(train_per_group=0.01, gen_per_group=0.004, publish=0.065, apply=0.035)
    p = predict(c, Setting(minibatch_groups=8, batch_groups=8, buffer_groups=16, sync_every=2,
                           chunk_groups=16, actors=2))
    out = write_toml(str(REPO / "configs" / "quickstart.toml"), ["learner.lr=1e-4"], p,
                     tmp_path / "rec.toml", Rules())
    text = out.read_text()
    assert text.startswith("# rapid-tune recommend") and "--actors 2" in text
    assert f"{p.updates_per_s:.2f} updates/s" in text
    cfg = load_config(out)
    assert (cfg.learner.minibatch_groups, cfg.learner.buffer_groups, cfg.learner.sync_every,
            cfg.actor.chunk_groups, cfg.learner.lr) == (8, 16, 2, 16, 1e-4)
    assert tomllib.loads(text)["run"]["eval_size"] == 200  # the rest of the quickstart kept


@pytest.mark.slow
def test_rapid_tune_recommend_end_to_end(tmp_path, random_model_dir):
    """Two calibration trials, the search, the TOML and a verification trial on the
    random tiny model with tiny batches; each trial runs 8 updates, however slow
    the machine (about 60 s)."""
    root = tmp_path / "rec"
    proc = subprocess.run(
        [sys.executable, "-m", "rapid_async.cli", "tune", "recommend", "--config",
         str(REPO / "configs" / "quickstart.toml"), "--actors", "1", "--budget-s", "400", "--steps", "8",
         "--root", str(root), "--max-actors", "2",
         "--set", f"model.path={random_model_dir}", "--set", "run.eval_size=10",
         "--set", "algo.group_size=2", "--set", "learner.minibatch_groups=8",
         "--set", "learner.batch_groups=8", "--set", "learner.buffer_groups=32",
         "--set", "actor.chunk_groups=8"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((root / "recommend.json").read_text())
    rec = result["recommended"]
    assert rec["predicted"]["updates_per_s"] > 0 and rec["measured"]["updates_per_s"] > 0
    assert rec["predicted"]["mean_staleness"] <= 3.0
    cfg = load_config(root / "recommended.toml")
    assert cfg.learner.minibatch_groups == rec["setting"]["minibatch_groups"]
    assert "predicted" in proc.stdout and "measured" in proc.stdout
    assert (root / "recommend.md").read_text().count("| updates_per_s |") == 2


def test_a_gpu_node_searches_the_learners_share_of_the_gpus():
    base = Setting(devices=4, actors=3, kind="cuda")
    space = search_space(base, Rules(max_actors=3))
    assert {s.learner_devices for s in space} == {1, 2, 3}
    assert {s.learner_devices for s in search_space(Setting(devices=4), Rules())} == {1}  # CPU
    two = next(s for s in space if s.learner_devices == 2)
    assert "learner.devices=2" in two.overrides()
