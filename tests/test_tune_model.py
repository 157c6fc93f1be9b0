"""rapid_async.tune.model and calibrate: closed-form cases, and predictions of recorded runs.

The recorded runs are short real runs of the quickstart on the 2-core
machine (tests/fixtures/tune, see RECORDED.md there): the model is calibrated
on the two "calibration" runs and must predict the updates/s of the five
"held-out" runs within 20% for at least four of them.
"""

from __future__ import annotations

import json

import pytest

from rapid_async.tune.calibrate import _line, calibrate, standalone_costs
from rapid_async.tune.measure import measure_run
from rapid_async.tune.model import Costs, Setting, plan_devices, predict
from tune_fixtures import FIXTURES, fixture_run


def test_learner_bound_rate_is_one_over_the_learner_step():
    c = Costs(train_per_group=0.01, gen_per_group=1e-4, publish=0.05, other=0.01)
    p = predict(c, Setting(minibatch_groups=32, batch_groups=32, buffer_groups=96))
    # 1 / (32 * 0.01 + 0.05 + 0.01) = 1 / 0.38
    assert p.updates_per_s == pytest.approx(1 / 0.38, rel=1e-6)
    assert p.learner["wait"] == pytest.approx(0.0, abs=1e-9)
    assert p.learner["train"] == pytest.approx(0.32 / 0.38, rel=1e-6)
    # the pipeline is full: a chunk waits behind (96 - 32) / 32 = 2 mini-batches
    # plus the one in training -> staleness 3
    assert p.staleness_hist == {3: sum(p.staleness_hist.values())}
    assert p.bottleneck == "learner" and p.drop_frac == 0.0


def test_actor_bound_rate_is_one_over_chunk_generation_and_apply():
    c = Costs(train_per_group=1e-6, gen_per_group=0.01, apply=0.02)
    p = predict(c, Setting(minibatch_groups=8, batch_groups=8, chunk_groups=8,
                           buffer_groups=64, max_staleness=8))
    # per update: generate 8 groups (0.08 s) and apply one version (0.02 s)
    assert p.updates_per_s == pytest.approx(1 / 0.10, rel=1e-3)
    assert p.bottleneck == "actors" and p.learner["wait"] > 0.99
    assert p.actor_busy == pytest.approx(1.0, abs=1e-3)


def test_evaluations_by_actors_take_actor_time():
    c = Costs(train_per_group=1e-6, gen_per_group=0.01, apply=0.02, actor_eval=0.2)
    s = Setting(minibatch_groups=8, batch_groups=8, chunk_groups=8, buffer_groups=64,
                max_staleness=8, eval_every=4)
    # every 4 updates: 4 x (0.08 generation + 0.02 apply) + one 0.2 s evaluation
    assert predict(c, s, updates=200).updates_per_s == pytest.approx(4 / 0.6, rel=0.02)
    assert predict(c, Setting(**{**s.__dict__, "eval_every": 0})).updates_per_s == \
        pytest.approx(10.0, rel=1e-3)


def test_publisher_thread_shares_the_learners_device_and_delays_weights():
    c = Costs(train_per_group=0.01, gen_per_group=1e-4, publish=0.001, publish_bg=0.16)
    p = predict(c, Setting(minibatch_groups=32, batch_groups=32, buffer_groups=96))
    # the learner (0.32 + 0.001 s a step) and the encoder (0.16 s a version) share
    # one core: 0.481 s of work per step
    assert p.updates_per_s == pytest.approx(1 / 0.481, rel=0.01)
    assert p.staleness_mean > 3.0  # weights reach the actor later than the step


def test_rapid_sync_round_and_staleness():
    c = Costs(train_per_group=0.01, gen_per_group=0.002, publish=0.05, apply=0.03)
    p = predict(c, Setting(mode="rapid-sync", batch_groups=64, minibatch_groups=16,
                           chunk_groups=64))
    # one round: apply 0.03, generate 64 x 0.002 = 0.128, 4 x 0.16 training, publish 0.05
    assert p.updates_per_s == pytest.approx(4 / (0.03 + 0.128 + 0.64 + 0.05), rel=1e-6)
    # 4 updates on one batch: staleness 0, 1, 2, 3
    assert p.staleness_mean == pytest.approx(1.5)


def test_max_staleness_0_drops_what_is_generated_ahead():
    c = Costs(train_per_group=0.01, gen_per_group=0.001)
    p = predict(c, Setting(max_staleness=0, buffer_groups=96, minibatch_groups=32,
                           batch_groups=32, chunk_groups=32))
    # with max_staleness 0 every grant is at the current version v: three chunks
    # of 32 fill the buffer, the learner takes one (which frees room for a fourth
    # at v) and trains; at v + 1 the other three are stale: 3 of 4 dropped
    assert p.drop_frac == pytest.approx(3 / 4, abs=0.02)
    assert p.staleness_hist.keys() == {0}


def test_more_staleness_per_version_means_more_truncation():
    c = Costs(train_per_group=0.01, gen_per_group=1e-4, truncated_per_version=0.01,
              ess_loss_per_version=0.02)
    p = predict(c, Setting())
    assert p.truncated_frac == pytest.approx(0.01 * p.staleness_mean)
    assert p.ess_per_group == pytest.approx(1 - 0.02 * p.staleness_mean)


def test_an_actor_on_the_learners_core_slows_the_learner():
    c = Costs(train_per_group=0.01, gen_per_group=0.004)
    one = predict(c, Setting(actors=1, devices=2))
    two = predict(c, Setting(actors=2, devices=2))
    three_devices = predict(c, Setting(actors=2, devices=3))
    assert plan_devices(2, 2) == {"learner": ("0",), "actor-0": ("1",), "actor-1": ("0",)}
    assert two.updates_per_s < one.updates_per_s * 0.95
    assert three_devices.updates_per_s == pytest.approx(one.updates_per_s, rel=0.02)


def test_learner_devices_speed_up_training_on_a_gpu_node():
    c = Costs(train_per_group=0.01, gen_per_group=1e-4, learner_scaling=0.8)
    assert plan_devices(3, 4, learner_devices=2, kind="cuda") == {
        "learner": ("0", "1"), "actor-0": ("2",), "actor-1": ("3",), "actor-2": ("2",)}
    assert plan_devices(2, 1, kind="cuda") == {"learner": ("0",), "actor-0": ("0",),
                                              "actor-1": ("0",)}
    one = predict(c, Setting(actors=3, devices=4, learner_devices=1, kind="cuda"))
    two = predict(c, Setting(actors=2, devices=4, learner_devices=2, kind="cuda"))
    assert two.updates_per_s == pytest.approx(one.updates_per_s * 1.8, rel=1e-3)


def test_plan_devices_matches_the_launcher_on_this_machine():
    import os

    from rapid_async.launch import _gpu_count, device_plan

    if _gpu_count():
        pytest.skip("a GPU node: the launcher plans GPUs")
    cores = sorted(os.sched_getaffinity(0))
    for n, m in ((1, 1), (2, 1), (3, 1), (2, 2)):
        plan = device_plan(n, learner_devices=m)
        ours = plan_devices(n, len(cores), learner_devices=m)
        names = ["learner"] + [f"actor-{i}" for i in range(n)]
        theirs = [tuple(str(cores.index(int(c))) for c in p["RAPID_CPU_AFFINITY"].split(","))
                  for p in plan]
        assert theirs == [ours[name] for name in names]


def test_line_fit_is_exact_on_a_line_and_proportional_for_one_size():
    assert _line([(8, 0.09), (32, 0.33)]) == pytest.approx((0.01, 0.01))
    assert _line([(16, 0.32), (16, 0.16)]) == pytest.approx((0.0, 0.015))
    intercept, slope = _line([(8, 0.2), (32, 0.1)])  # falling: refit through the origin
    assert intercept == 0.0 and slope > 0


def test_calibration_removes_the_sharing_of_a_shared_core():
    shared = measure_run(fixture_run("two-actors"))
    alone = measure_run(fixture_run("mb16"))
    _, est = standalone_costs(shared)
    # training measured with an actor on the learner's core looks slower than
    # it is; de-rated, it is the cost of training alone
    assert shared.learner["train_s"] > alone.learner["train_s"] * 1.2
    assert est["learner/train"] == pytest.approx(alone.learner["train_s"], rel=0.25)


def test_model_predicts_held_out_runs_within_20_percent():
    spec = json.loads((FIXTURES / "runs.json").read_text())
    runs = {name: measure_run(fixture_run(name)) for name in spec["runs"]}
    costs = calibrate([runs[n] for n, r in spec["runs"].items() if r["use"] == "calibration"])
    held_out = [n for n, r in spec["runs"].items() if r["use"] == "held-out"]
    errors = {}
    for name in held_out:
        predicted = predict(costs, Setting.from_run(runs[name])).updates_per_s
        errors[name] = predicted / runs[name].updates_per_s - 1
    assert len(held_out) == 5
    assert sum(abs(e) <= 0.2 for e in errors.values()) >= 4, errors
