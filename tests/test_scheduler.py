"""Tests of rapid_async.learner.scheduler: grants per mode, deliveries, silent actors."""

from __future__ import annotations

import time

from rapid_async.learner import scheduler as scheduler_module
from rapid_async.learner.scheduler import (ACCEPTED, DUPLICATE, LATE, UNGRANTED, WRONG_ACTOR,
                                           WorkScheduler)


def _deliver_all(s: WorkScheduler, actor: str, grant) -> None:
    for i in grant.indices:
        assert s.delivered(actor, i, grant.grant_id) == ACCEPTED


def test_async_grants_bounded_by_capacity_minus_buffered_minus_in_flight():
    s = WorkScheduler("rapid-async", batch_groups=8, capacity=10, max_staleness=4)
    a = s.grant("A", max_groups=5, buffered=3, version=0)
    assert a.indices == [0, 1, 2, 3, 4] and s.in_flight() == 5
    b = s.grant("B", max_groups=5, buffered=3, version=0)
    assert b.indices == [5, 6]  # 10 - 3 - 5
    assert s.grant("B", max_groups=5, buffered=3, version=0).indices == []
    # Two of A's groups arrive in the buffer: in flight 5, buffered 5, still full.
    assert s.delivered("A", 0, a.grant_id) == ACCEPTED
    assert s.delivered("A", 1, a.grant_id) == ACCEPTED
    assert s.in_flight() == 5
    assert s.grant("A", max_groups=5, buffered=5, version=0).indices == []
    # The learner consumes 4 groups: room for 4 more, indices continue.
    assert s.grant("A", max_groups=8, buffered=1, version=1).indices == [7, 8, 9, 10]
    assert s.in_flight() == 9


def test_async_grants_never_go_negative_when_over_capacity():
    s = WorkScheduler("rapid-async", batch_groups=8, capacity=4, max_staleness=4)
    assert s.grant("A", max_groups=3, buffered=9, version=0)[:2] == ([], 0)
    assert s.next_index == 0


def test_async_min_version():
    s = WorkScheduler("rapid-async", batch_groups=8, capacity=100, max_staleness=4)
    assert s.grant("A", 1, 0, version=10).min_version == 7  # one version of headroom: 10 - 4 + 1
    assert s.grant("A", 1, 0, version=2).min_version == 0  # never negative
    zero = WorkScheduler("rapid-async", batch_groups=8, capacity=100, max_staleness=0)
    # Staleness 0: generate with the current weights (a version not yet
    # trained would never come, since training waits for this data).
    assert zero.grant("A", 1, 0, version=5).min_version == 5
    assert zero.grant("A", 1, 0, version=0).min_version == 0


def test_start_index_continues_the_data_stream():
    s = WorkScheduler("rapid-async", batch_groups=8, capacity=100, max_staleness=4,
                      start_index=40)
    assert s.grant("A", 3, 0, 0).indices == [40, 41, 42]


def test_sync_rounds_hand_out_exactly_batch_groups():
    for mode in ("grpo", "rapid-sync"):
        s = WorkScheduler(mode, batch_groups=6, capacity=100, max_staleness=1)
        assert s.grant("A", 4, 0, version=0)[:2] == ([], 0)  # no round open yet
        s.open_round(3)
        a = s.grant("A", 4, buffered=0, version=7)
        b = s.grant("B", 4, buffered=0, version=7)
        assert a.indices == [0, 1, 2, 3] and b.indices == [4, 5]
        assert a.min_version == b.min_version == 3  # the round's version, not the caller's
        assert s.grant("A", 4, 0, 7).indices == []
        _deliver_all(s, "A", a)
        _deliver_all(s, "B", b)
        assert s.in_flight() == 0
        assert s.grant("A", 4, 0, 7).indices == []  # still nothing until the next round
        s.open_round(4)
        assert s.grant("B", 10, 0, 0)[:2] == ([6, 7, 8, 9, 10, 11], 4)


def test_every_grant_has_its_own_unguessable_id():
    s = WorkScheduler("rapid-async", batch_groups=8, capacity=100, max_staleness=4)
    ids = {s.grant("A", 1, 0, 0).grant_id for _ in range(50)}
    assert len(ids) == 50 and min(ids) > 0 and max(ids) > 2**40


def test_work_is_accepted_once_and_refusals_say_why():
    s = WorkScheduler("rapid-async", batch_groups=8, capacity=100, max_staleness=4)
    g = s.grant("A", 3, 0, 0)
    assert s.check("A", 1, g.grant_id) == (ACCEPTED, 0)  # check changes nothing
    assert s.delivered("A", 1, g.grant_id) == ACCEPTED
    assert s.delivered("A", 1, g.grant_id) == DUPLICATE  # twice
    assert s.delivered("B", 0, g.grant_id) == WRONG_ACTOR  # A's grant, B's name
    assert s.delivered("A", 0, g.grant_id + 1) == UNGRANTED  # a grant nobody made
    assert s.delivered("A", 99, g.grant_id) == UNGRANTED  # never granted
    assert s.delivered("A", 0, g.grant_id) == ACCEPTED  # the forgery did not consume it
    assert s.in_flight() == 1
    assert sorted(s.actors()) == ["A"]


def test_revoked_work_goes_out_again_under_a_new_grant():
    s = WorkScheduler("rapid-sync", batch_groups=2, capacity=100, max_staleness=1)
    s.open_round(0)
    g = s.grant("A", 2, 0, 0)
    assert s.revoke(1, g.grant_id)  # e.g. the group failed validation
    assert not s.revoke(1, g.grant_id)
    again = s.grant("B", 4, 0, 0)
    assert again.indices == [1] and again.grant_id != g.grant_id
    assert s.delivered("A", 1, g.grant_id) == LATE
    assert s.delivered("B", 1, again.grant_id) == ACCEPTED


def test_expire_silent_reissues_in_async_mode():
    s = WorkScheduler("rapid-async", batch_groups=8, capacity=10, max_staleness=4,
                      actor_timeout=0.05)
    g = s.grant("A", 3, 0, 0)
    assert s.expire_silent() == []  # not silent yet
    time.sleep(0.1)
    s.seen("B")
    assert s.expire_silent() == ["A"]
    assert s.in_flight() == 0 and s.reissued == 3
    b = s.grant("B", 5, 0, 0)
    assert b.indices == [0, 1, 2, 3, 4]  # reissued first, then new
    assert s.delivered("A", 0, g.grant_id) == LATE  # late delivery of reissued work
    assert s.delivered("B", 0, b.grant_id) == ACCEPTED


def test_heartbeats_keep_a_slow_actor_and_its_work():
    s = WorkScheduler("rapid-async", batch_groups=8, capacity=10, max_staleness=4,
                      actor_timeout=0.15)
    g = s.grant("A", 2, 0, 0)
    for _ in range(5):  # 0.25 s of generation, one heartbeat every 0.05 s
        time.sleep(0.05)
        s.seen("A")
        assert s.expire_silent() == []
    assert s.delivered("A", 0, g.grant_id) == ACCEPTED and s.reissued == 0


def test_sync_round_completes_after_an_actor_goes_silent():
    s = WorkScheduler("rapid-sync", batch_groups=4, capacity=100, max_staleness=1,
                      actor_timeout=0.05)
    s.open_round(0)
    a = s.grant("A", 3, 0, 0)
    b = s.grant("B", 3, 0, 0)
    assert a.indices == [0, 1, 2] and b.indices == [3]
    assert s.delivered("B", 3, b.grant_id) == ACCEPTED
    time.sleep(0.1)
    s.seen("B")
    assert s.expire_silent() == ["A"]
    # B picks up exactly A's work; the round then has nothing more to give.
    b2 = s.grant("B", 8, 0, 0)
    assert b2[:2] == ([0, 1, 2], 0)
    assert s.grant("B", 8, 0, 0).indices == []
    _deliver_all(s, "B", b2)
    assert s.delivered("A", 1, a.grant_id) == LATE
    assert s.in_flight() == 0 and s.next_index == 4
    s.open_round(1)
    assert s.grant("B", 8, 0, 0)[:2] == ([4, 5, 6, 7], 1)


def test_a_new_round_does_not_leak_reissued_work_of_an_old_round():
    # The reproducer: an actor taken for gone, its prompts queued for
    # reissue, then the learner moves on. The new round must hand out new
    # prompts, not the old round's (which were trained, or were withdrawn).
    s = WorkScheduler("rapid-sync", batch_groups=4, capacity=100, max_staleness=1,
                      actor_timeout=0.05)
    s.open_round(0)
    s.grant("A", 4, 0, 0)
    time.sleep(0.1)
    s.seen("B")
    assert s.expire_silent() == ["A"]
    s.open_round(1)
    assert s.grant("B", 8, 0, 0)[:2] == ([4, 5, 6, 7], 1)


def test_forget_reissues_and_late_delivery_is_rejected():
    s = WorkScheduler("grpo", batch_groups=4, capacity=100, max_staleness=0)
    s.open_round(0)
    a = s.grant("A", 4, 0, 0)
    assert a.indices == [0, 1, 2, 3]
    assert s.delivered("A", 2, a.grant_id) == ACCEPTED
    s.forget("A")
    assert s.actors() == [] and s.reissued == 3
    assert s.grant("B", 8, 0, 0).indices == [0, 1, 3]
    assert s.grant("B", 8, 0, 0).indices == []
    assert s.delivered("A", 0, a.grant_id) == LATE
    s.forget("nobody")  # harmless


def test_state_stays_bounded():
    s = WorkScheduler("rapid-async", batch_groups=8, capacity=4, max_staleness=4,
                      actor_timeout=0.01, forget_after=0.02)
    for i in range(300):
        s.seen(f"drive-by-{i}")
    time.sleep(0.05)
    assert len(s.prune()) == 300 and s.actors() == []
    scheduler_module.CLOSED_MEMORY, saved = 16, scheduler_module.CLOSED_MEMORY
    try:
        for _ in range(100):
            g = s.grant("A", 4, 0, 0)
            _deliver_all(s, "A", g)
        assert len(s._closed) == 16
    finally:
        scheduler_module.CLOSED_MEMORY = saved


def test_idle_actors_are_the_silent_ones_without_work():
    s = WorkScheduler("rapid-async", batch_groups=8, capacity=10, max_staleness=4)
    s.seen("idle")
    s.grant("busy", 1, 0, 0)
    time.sleep(0.05)
    s.seen("fresh")
    assert s.idle_actors(min_silence=0.03) == ["idle"]
