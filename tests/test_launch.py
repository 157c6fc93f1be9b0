"""Tests of rapid_async.launch: where the learner's ranks and the actors run."""

from __future__ import annotations

import os

import pytest

from rapid_async.launch import _gpu_plan, device_plan


def devices(plan):
    return [env["CUDA_VISIBLE_DEVICES"] for env in plan]


def test_gpu_plan_first_gpus_train_the_others_act():
    assert devices(_gpu_plan(3, 4, 1, "", "")) == ["0", "1", "2", "3"]
    assert devices(_gpu_plan(2, 4, 2, "", "")) == ["0,1", "2", "3"]
    assert devices(_gpu_plan(4, 4, 2, "", "")) == ["0,1", "2", "3", "2", "3"]  # actors wrap
    assert devices(_gpu_plan(1, 1, 1, "", "")) == ["0", "0"]  # one GPU: shared
    assert all(env["RAPID_DEVICE"] == "cuda" for env in _gpu_plan(2, 4, 2, "", ""))


def test_gpu_plan_overrides_and_errors():
    assert devices(_gpu_plan(2, 8, 2, "6,7", "0,1")) == ["6,7", "0", "1"]
    with pytest.raises(ValueError, match="learner.devices = 3 needs that many GPUs of the 2"):
        _gpu_plan(1, 2, 3, "", "")
    with pytest.raises(ValueError, match="learner.devices"):
        _gpu_plan(1, 4, 2, "5,6", "")
    with pytest.raises(ValueError, match="actor.gpus = '9'"):
        _gpu_plan(1, 4, 1, "", "9")


def test_cpu_plan_gives_each_learner_rank_a_core():
    cores = sorted(os.sched_getaffinity(0))
    plan = device_plan(1, learner_devices=2)
    if plan[0].get("RAPID_DEVICE") != "cpu":
        pytest.skip("this machine has a GPU")
    assert plan[0]["RAPID_CPU_AFFINITY"] == f"{cores[0]},{cores[1 % len(cores)]}"
    assert plan[1]["RAPID_CPU_AFFINITY"] == str(cores[2 % len(cores)])
    assert device_plan(1)[0]["RAPID_CPU_AFFINITY"] == str(cores[0])
