"""rapid_async.tune.sim: simulated time, processor sharing per device, waits."""

from __future__ import annotations

import pytest

from rapid_async.tune.sim import Simulation, Wait, Work


def worker(seconds: float, log: list, name: str):
    yield Work("compute", seconds)
    log.append(name)


def test_two_processes_on_one_device_share_it_equally():
    sim = Simulation()
    done: list = []
    a = sim.add("a", worker(1.0, done, "a"), ("0",))
    b = sim.add("b", worker(3.0, done, "b"), ("0",))
    sim.run(stop=lambda: len(done) == 2, t_max=100)
    # both at half speed until a is done at t = 2 (1 s of work), then b alone:
    # b has 3 - 1 = 2 s left at full speed -> t = 4
    assert done == ["a", "b"]
    assert sim.now == pytest.approx(4.0)
    assert a.time["compute"] == pytest.approx(2.0) and b.time["compute"] == pytest.approx(4.0)


def test_processes_on_separate_devices_run_in_parallel():
    sim = Simulation()
    done: list = []
    sim.add("a", worker(1.0, done, "a"), ("0",))
    sim.add("b", worker(3.0, done, "b"), ("1",))
    sim.run(stop=lambda: len(done) == 2, t_max=100)
    assert sim.now == pytest.approx(3.0)


def test_a_process_on_two_devices_runs_at_the_speed_of_the_busier_one():
    sim = Simulation()
    done: list = []
    sim.add("wide", worker(2.0, done, "wide"), ("0", "1"))
    sim.add("other", worker(10.0, done, "other"), ("1",))
    sim.run(stop=lambda: "wide" in done, t_max=100)
    assert sim.now == pytest.approx(4.0)  # device 1 is shared: half speed


def test_wait_resumes_when_another_process_changes_state():
    sim = Simulation()
    state = {"ready": False}
    log: list = []

    def producer():
        yield Work("make", 2.0)
        state["ready"] = True

    def consumer():
        yield Wait("wait", lambda: state["ready"])
        log.append(sim.now)
        yield Work("use", 1.0)
        log.append(sim.now)

    sim.add("p", producer(), ("0",))
    c = sim.add("c", consumer(), ("1",))
    sim.run(stop=lambda: len(log) == 2, t_max=100)
    assert log == [pytest.approx(2.0), pytest.approx(3.0)]
    assert c.time["wait"] == pytest.approx(2.0) and c.count["use"] == 1
    snap = sim.snapshot()
    assert snap["c"][0]["use"] == pytest.approx(1.0)


def test_run_returns_when_nothing_can_move_and_rejects_bad_requests():
    sim = Simulation()
    sim.add("stuck", iter([Wait("wait", lambda: False)]), ("0",))
    sim.run(stop=lambda: False, t_max=100)
    assert sim.now == 0.0
    with pytest.raises(TypeError, match="not Work or Wait"):
        Simulation().add("bad", iter(["sleep"]), ("0",))
