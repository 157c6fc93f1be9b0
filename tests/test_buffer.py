"""Tests of rapid_async.learner.buffer: FIFO of whole groups, staleness drops, threads."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from rapid_async.learner.buffer import RolloutBuffer


@dataclass
class Group:
    """Stand-in for a RolloutGroup: the buffer only reads policy_version."""

    name: str
    policy_version: int


def test_rejects_negative_staleness():
    with pytest.raises(ValueError, match="max_staleness"):
        RolloutBuffer(max_staleness=-1)


def test_fifo_order_of_whole_groups():
    buf = RolloutBuffer(max_staleness=10)
    groups = [Group(f"g{i}", 0) for i in range(5)]
    for g in groups:
        buf.put(g)
    assert len(buf) == 5
    first = buf.take(2, version=0, timeout=0)
    assert first is not None and [g.name for g in first] == ["g0", "g1"]
    assert first[0] is groups[0]  # the very objects, not copies or splits
    rest = buf.take(3, version=0, timeout=0)
    assert [g.name for g in rest] == ["g2", "g3", "g4"]
    assert len(buf) == 0
    assert buf.stats()["buffer/accepted"] == 5 and buf.stats()["buffer/consumed"] == 5


def test_stale_groups_dropped_and_counted_at_take_time():
    buf = RolloutBuffer(max_staleness=2)
    for name, v in [("v1", 1), ("v2", 2), ("v3", 3), ("v5", 5), ("v4", 4)]:
        buf.put(Group(name, v))
    # Nothing is dropped on put, only when taking at a version.
    assert len(buf) == 5 and buf.dropped_stale == 0
    # At version 5: staleness 4, 3 drop (> 2); 2, 0, 1 stay, order kept.
    out = buf.take(2, version=5, timeout=0)
    assert [g.name for g in out] == ["v3", "v5"]
    assert buf.dropped_stale == 2
    assert [g.name for g in buf.take(1, version=5, timeout=0)] == ["v4"]
    assert buf.stats()["buffer/dropped_stale"] == 2


def test_staleness_bound_is_inclusive_and_zero_allowed():
    buf = RolloutBuffer(max_staleness=0)
    buf.put(Group("old", 6))
    buf.put(Group("now", 7))
    assert buf.drop_stale(7) == 1
    assert [g.name for g in buf.take(1, version=7, timeout=0)] == ["now"]


def test_take_timeout_returns_none_and_keeps_fresh_groups():
    buf = RolloutBuffer(max_staleness=1)
    buf.put(Group("stale", 0))
    buf.put(Group("fresh", 2))
    t0 = time.monotonic()
    assert buf.take(2, version=2, timeout=0.2) is None
    waited = time.monotonic() - t0
    assert 0.15 <= waited < 2.0
    assert len(buf) == 1 and buf.dropped_stale == 1 and buf.consumed == 0
    assert [g.name for g in buf.take(1, version=2, timeout=0)] == ["fresh"]


def test_take_wakes_up_when_a_group_arrives():
    buf = RolloutBuffer(max_staleness=0)
    timer = threading.Timer(0.1, buf.put, args=(Group("late", 0),))
    timer.start()
    t0 = time.monotonic()
    out = buf.take(1, version=0, timeout=5.0)
    timer.join()
    assert out is not None and out[0].name == "late"
    assert time.monotonic() - t0 < 2.0  # woken by put, not by the timeout


def test_producer_thread_and_consumer_keep_every_group_in_order():
    buf = RolloutBuffer(max_staleness=100)
    n = 300

    def produce():
        for i in range(n):
            buf.put(Group(str(i), 0))
            if i % 50 == 0:
                time.sleep(0.01)

    producer = threading.Thread(target=produce)
    producer.start()
    seen = []
    while len(seen) < n:
        out = buf.take(7 if n - len(seen) >= 7 else n - len(seen), version=0, timeout=5.0)
        assert out is not None, "consumer starved: a put was lost"
        seen.extend(int(g.name) for g in out)
    producer.join()
    assert seen == list(range(n))
    assert buf.accepted == n and buf.consumed == n and len(buf) == 0


def test_staleness_histogram_from_record_consumed():
    buf = RolloutBuffer(max_staleness=4)
    for v in (3, 3, 4, 5):
        buf.put(Group(f"v{v}", v))
    mb = buf.take(4, version=5, timeout=0)
    buf.record_consumed(mb[:2], version=5)  # first update of the batch at version 5
    buf.record_consumed(mb[2:], version=6)  # next update, one version later
    assert buf.stats()["staleness/hist"] == {"1": 1, "2": 3}
    assert list(buf.stats()["staleness/hist"]) == ["1", "2"]  # sorted by staleness


def test_the_prompts_of_stale_and_waiting_groups_are_known():
    @dataclass
    class Named:
        prompt_id: str
        policy_version: int

    buf = RolloutBuffer(max_staleness=1)
    for i, v in enumerate([0, 2, 1, 3]):
        buf.put(Named(str(i), v))
    assert buf.prompt_ids() == ["0", "1", "2", "3"]
    assert [g.prompt_id for g in buf.take(1, version=3, timeout=0)] == ["1"]
    assert buf.pop_dropped() == ["0", "2"] and buf.pop_dropped() == []
    assert buf.prompt_ids() == ["3"]


def test_a_group_with_in_flight_updates_is_as_stale_as_its_oldest_token():
    """Per-token versions 2, 2, 2 | 4 (runs [k, version, count]): the group's
    policy_version is 2 and the buffer measures staleness from it, not from 4."""
    import torch

    from rapid_async.actor.rollout import pack_group
    from rapid_async.engines.base import Completion

    completions = [Completion([5, 6, 7], [-0.1, -0.2, -0.3], "stop", versions=[2, 2, 4]),
                   Completion([8], [-0.5], "stop", versions=[4])]
    group = pack_group("a", "7", 4, [1, 2], completions, [1.0, 0.0], 0.1)
    assert group.policy_version == 2 and group.newest_version() == 4
    assert group.version_runs.tolist() == [[0, 2, 2], [0, 4, 1], [1, 4, 1]]
    assert group.token_versions().tolist() == [[2, 2, 4], [4, 0, 0]]
    same = pack_group("a", "8", 4, [1, 2], [Completion([5], [-0.1], versions=[4])] * 2,
                      [1.0, 0.0], 0.1)
    assert same.version_runs is None and same.policy_version == 4  # one version: no runs
    buf = RolloutBuffer(max_staleness=2)
    buf.put(group)
    buf.put(same)
    assert buf.take(1, version=5, timeout=0) == [same]  # 5 - 2 = 3 > 2: dropped
    assert buf.dropped_stale == 1 and buf.pop_dropped() == ["7"]
    buf.put(group)
    taken = buf.take(1, version=4, timeout=0)
    buf.record_consumed(taken, version=4)
    assert buf.stats()["staleness/hist"] == {"2": 1}
    assert torch.equal(taken[0].version_runs, group.version_runs)
