"""Tests of rapid_async.learner.scheduler: grants per mode, deliveries, silent actors."""

from __future__ import annotations

import time

from rapid_async.learner.scheduler import WorkScheduler


def test_async_grants_bounded_by_capacity_minus_buffered_minus_in_flight():
    s = WorkScheduler("rapid-async", batch_groups=8, capacity=10, max_staleness=4)
    a, _ = s.grant("A", max_groups=5, buffered=3, version=0)
    assert a == [0, 1, 2, 3, 4] and s.in_flight() == 5
    b, _ = s.grant("B", max_groups=5, buffered=3, version=0)
    assert b == [5, 6]  # 10 - 3 - 5
    assert s.grant("B", max_groups=5, buffered=3, version=0)[0] == []
    # Two of A's groups arrive in the buffer: in flight 5, buffered 5, still full.
    assert s.delivered("A", 0) and s.delivered("A", 1)
    assert s.in_flight() == 5
    assert s.grant("A", max_groups=5, buffered=5, version=0)[0] == []
    # The learner consumes 4 groups: room for 4 more, indices continue.
    assert s.grant("A", max_groups=8, buffered=1, version=1)[0] == [7, 8, 9, 10]
    assert s.in_flight() == 9


def test_async_grants_never_go_negative_when_over_capacity():
    s = WorkScheduler("rapid-async", batch_groups=8, capacity=4, max_staleness=4)
    assert s.grant("A", max_groups=3, buffered=9, version=0) == ([], 0)
    assert s.next_index == 0


def test_async_min_version():
    s = WorkScheduler("rapid-async", batch_groups=8, capacity=100, max_staleness=4)
    assert s.grant("A", 1, 0, version=10)[1] == 7  # one version of headroom: 10 - 4 + 1
    assert s.grant("A", 1, 0, version=2)[1] == 0  # never negative
    zero = WorkScheduler("rapid-async", batch_groups=8, capacity=100, max_staleness=0)
    # Staleness 0: generate with the current weights (a version not yet
    # trained would never come, since training waits for this data).
    assert zero.grant("A", 1, 0, version=5)[1] == 5
    assert zero.grant("A", 1, 0, version=0)[1] == 0


def test_start_index_continues_the_data_stream():
    s = WorkScheduler("rapid-async", batch_groups=8, capacity=100, max_staleness=4,
                      start_index=40)
    assert s.grant("A", 3, 0, 0)[0] == [40, 41, 42]


def test_sync_rounds_hand_out_exactly_batch_groups():
    for mode in ("grpo", "rapid-sync"):
        s = WorkScheduler(mode, batch_groups=6, capacity=100, max_staleness=1)
        assert s.grant("A", 4, 0, version=0) == ([], 0)  # no round open yet
        s.open_round(3)
        a, va = s.grant("A", 4, buffered=0, version=7)
        b, vb = s.grant("B", 4, buffered=0, version=7)
        assert a == [0, 1, 2, 3] and b == [4, 5]
        assert va == vb == 3  # the round's version, not the caller's
        assert s.grant("A", 4, 0, 7)[0] == []
        for i in a:
            assert s.delivered("A", i)
        for i in b:
            assert s.delivered("B", i)
        assert s.in_flight() == 0
        assert s.grant("A", 4, 0, 7)[0] == []  # still nothing until the next round
        s.open_round(4)
        assert s.grant("B", 10, 0, 0) == ([6, 7, 8, 9, 10, 11], 4)


def test_delivered_bookkeeping():
    s = WorkScheduler("rapid-async", batch_groups=8, capacity=100, max_staleness=4)
    s.grant("A", 3, 0, 0)
    assert s.delivered("A", 1)
    assert not s.delivered("A", 1)  # twice
    assert not s.delivered("B", 0)  # not granted to B
    assert not s.delivered("A", 99)  # never granted
    assert s.rejected_unknown == 3
    assert s.in_flight() == 2
    assert sorted(s.actors()) == ["A", "B"]


def test_expire_silent_reissues_in_async_mode():
    s = WorkScheduler("rapid-async", batch_groups=8, capacity=10, max_staleness=4,
                      actor_timeout=0.05)
    s.grant("A", 3, 0, 0)
    assert s.expire_silent() == []  # not silent yet
    time.sleep(0.1)
    s.seen("B")
    assert s.expire_silent() == ["A"]
    assert s.in_flight() == 0 and s.reissued == 3
    assert s.grant("B", 5, 0, 0)[0] == [0, 1, 2, 3, 4]  # reissued first, then new
    assert not s.delivered("A", 0)  # late delivery of reissued work
    assert s.delivered("B", 0)


def test_sync_round_completes_after_an_actor_goes_silent():
    s = WorkScheduler("rapid-sync", batch_groups=4, capacity=100, max_staleness=1,
                      actor_timeout=0.05)
    s.open_round(0)
    assert s.grant("A", 3, 0, 0)[0] == [0, 1, 2]
    assert s.grant("B", 3, 0, 0)[0] == [3]
    assert s.delivered("B", 3)
    time.sleep(0.1)
    s.seen("B")
    assert s.expire_silent() == ["A"]
    # B picks up exactly A's work; the round then has nothing more to give.
    assert s.grant("B", 8, 0, 0) == ([0, 1, 2], 0)
    assert s.grant("B", 8, 0, 0)[0] == []
    for i in (0, 1, 2):
        assert s.delivered("B", i)
    assert not s.delivered("A", 1)
    assert s.in_flight() == 0 and s.next_index == 4
    s.open_round(1)
    assert s.grant("B", 8, 0, 0) == ([4, 5, 6, 7], 1)


def test_forget_reissues_and_late_delivery_is_rejected():
    s = WorkScheduler("grpo", batch_groups=4, capacity=100, max_staleness=0)
    s.open_round(0)
    assert s.grant("A", 4, 0, 0)[0] == [0, 1, 2, 3]
    assert s.delivered("A", 2)
    s.forget("A")
    assert s.actors() == [] and s.reissued == 3
    assert s.grant("B", 8, 0, 0)[0] == [0, 1, 3]
    assert s.grant("B", 8, 0, 0)[0] == []
    assert not s.delivered("A", 0)
    s.forget("nobody")  # harmless
