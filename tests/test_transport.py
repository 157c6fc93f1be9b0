"""Tests for rapid_async.wire.transport: real ZeroMQ sockets on loopback, random free ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import torch
import zmq

from rapid_async.wire.protocol import (
    PROTOCOL_VERSION,
    ActorStats,
    ErrorReply,
    Hello,
    RolloutGroup,
    SnapshotRequest,
    Stop,
    WeightUpdate,
    WorkGrant,
    WorkRequest,
    encode,
)
from rapid_async.wire.transport import ActorSockets, BadMessage, BindError, LearnerSockets, new_curve_keys
from rapid_async.weights import apply_update, make_delta, make_snapshot

SETTINGS = {"group_size": 4, "temperature": 1.0, "task": {"name": "arithmetic"}}


def _group(actor_id: str = "actor-0", version: int = 0, t: int = 3) -> RolloutGroup:
    return RolloutGroup(
        actor_id=actor_id,
        prompt_id="p1",
        policy_version=version,
        prompt_ids=torch.tensor([1, 2], dtype=torch.int32),
        completion_ids=torch.ones(2, t, dtype=torch.int32),
        completion_lengths=torch.tensor([t, t], dtype=torch.int32),
        logprobs=torch.full((2, t), -0.5),
        rewards=torch.tensor([1.0, 0.0]),
        finish_reasons=["stop", "stop"],
        gen_seconds=0.1,
        created_at=time.time(),
        info={},
    )


class ControlServer:
    """Answers control requests in a thread, as the learner loop would (only it touches control)."""

    def __init__(self, learner: LearnerSockets, weights: dict[str, torch.Tensor], version: int = 0):
        self.learner, self.weights, self.version = learner, weights, version
        self.received: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            got = self.learner.poll_control(timeout_ms=20)
            if got is None:
                continue
            identity, msg = got
            self.received.append(msg)
            if isinstance(msg, Hello):
                self.learner.reply(identity, self.learner.welcome(self.version, SETTINGS))
            elif isinstance(msg, SnapshotRequest):
                self.learner.reply(identity, make_snapshot(self.weights, self.version))
            elif isinstance(msg, WorkRequest):
                granted = list(range(msg.max_groups)) if msg.max_groups <= 3 else []
                reply = WorkGrant(granted, self.version) if granted or msg.max_groups == 0 else ErrorReply("too many")
                self.learner.reply(identity, reply)
            elif isinstance(msg, BadMessage):
                self.learner.reply(identity, ErrorReply(msg.reason))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture
def learner():
    sockets = LearnerSockets()
    yield sockets
    sockets.close()


@pytest.fixture
def served(learner):
    server = ControlServer(learner, {"w": torch.randn(4, 4), "b": torch.randn(3)}, version=5)
    yield server
    server.stop()


@pytest.fixture
def actor(learner, served):
    sockets = ActorSockets(learner.control_endpoint, "actor-0")
    sockets.welcome = sockets.hello(pid=os.getpid(), engine="hf", timeout_ms=5000)
    yield sockets
    sockets.close()


def _wait_for(predicate, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def test_endpoints_are_loopback_with_distinct_random_ports(learner):
    endpoints = [learner.rollout_endpoint, learner.weights_endpoint, learner.control_endpoint]
    assert all(e.startswith("tcp://127.0.0.1:") for e in endpoints)
    assert len({e.rsplit(":", 1)[1] for e in endpoints}) == 3


def test_hello_gets_welcome_with_endpoints_and_settings(learner, served, actor):
    assert actor.welcome.rollout_endpoint == learner.rollout_endpoint
    assert actor.welcome.weights_endpoint == learner.weights_endpoint
    assert actor.welcome.policy_version == 5 and actor.welcome.settings == SETTINGS
    assert served.received[0] == Hello("actor-0", os.getpid(), "hf")


def test_rollouts_are_delivered_in_order(learner, actor):
    for version in range(3):
        assert actor.send_rollout(_group(version=version), timeout_ms=1000)
    received = [learner.recv_rollout(timeout_ms=2000) for _ in range(3)]
    assert [g.policy_version for g in received] == [0, 1, 2]
    assert torch.equal(received[0].logprobs, torch.full((2, 3), -0.5))
    assert learner.recv_rollout(timeout_ms=0) is None


def test_snapshot_request_then_published_delta_reproduce_the_weights(learner, served, actor):
    snapshot = actor.request_snapshot("joined", timeout_ms=5000)
    state = apply_update(None, None, snapshot)
    assert snapshot.version == 5 and torch.equal(state["w"], served.weights["w"])
    new = {"w": served.weights["w"] * 1.5, "b": served.weights["b"]}
    delta = make_delta(served.weights, new, version=6, base_version=5)

    def publish_and_poll():  # the SUB may need a moment to reach the PUB (slow joiner)
        learner.publish(delta)
        return actor.recv_weights(timeout_ms=50)

    update = _wait_for(publish_and_poll)
    state = apply_update(state, 5, update)
    assert torch.equal(state["w"], new["w"]) and torch.equal(state["b"], new["b"])


def test_work_request_gets_a_grant_or_an_error(actor):
    assert actor.request_work(3, timeout_ms=5000) == WorkGrant([0, 1, 2], 5)
    assert actor.request_work(0, timeout_ms=5000) == WorkGrant([], 5)
    with pytest.raises(RuntimeError, match="refused the work request: too many"):
        actor.request_work(7, timeout_ms=5000)


def test_stats_and_stop(learner, served, actor):
    assert actor.send_stats({"tokens_per_s": 123.5, "engine": "hf", "groups": 7})
    _wait_for(lambda: any(isinstance(m, ActorStats) for m in served.received))
    stats = next(m for m in served.received if isinstance(m, ActorStats))
    assert stats == ActorStats("actor-0", {"tokens_per_s": 123.5, "engine": "hf", "groups": 7})
    assert actor.recv_control(timeout_ms=0) is None
    served.stop()  # control now belongs to this thread
    assert learner.broadcast(Stop("training finished")) == 1
    assert actor.poll(timeout_ms=2000) == {"control"}
    assert actor.recv_control(timeout_ms=0) == Stop("training finished")


def test_stop_arriving_during_a_snapshot_request_is_kept(learner, served, actor):
    served.stop()
    learner.broadcast(Stop("bye"))
    served_again = ControlServer(learner, served.weights, version=5)
    try:
        assert actor.request_snapshot("gap", timeout_ms=5000).kind == "snapshot"
        assert actor.recv_control() == Stop("bye")
    finally:
        served_again.stop()


def _raw_socket(kind: int, endpoint: str) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    sock = ctx.socket(kind)
    sock.linger = 0
    sock.connect(endpoint)
    return ctx, sock


def _bad_messages() -> dict[str, list[bytes]]:
    good = encode(_group())
    wrong_version = msgpack.unpackb(good[0])
    wrong_version["protocol"] = 7
    wrong_shape = msgpack.unpackb(good[0])
    wrong_shape["tensors"]["rewards"]["shape"] = [3]
    return {
        "not valid msgpack": [b"\xc1garbage"],
        f"got 7, expected {PROTOCOL_VERSION}": [msgpack.packb(wrong_version), *good[1:]],
        "frame has 8 bytes": [msgpack.packb(wrong_shape), *good[1:]],
        "wrong number of frames": good[:3],
    }


def test_malformed_rollouts_are_reported_and_the_next_good_one_arrives(learner):
    ctx, push = _raw_socket(zmq.PUSH, learner.rollout_endpoint)
    try:
        for frames in _bad_messages().values():
            push.send_multipart(frames)
        push.send_multipart(encode(Hello("intruder", 1, "hf")))  # valid message, wrong socket
        push.send_multipart(encode(_group(version=9)))
        for reason in [*_bad_messages(), "expected RolloutGroup on the rollouts socket, got Hello"]:
            bad = learner.recv_rollout(timeout_ms=2000)
            assert isinstance(bad, BadMessage) and bad.socket == "rollouts" and reason in bad.reason, bad
        assert learner.recv_rollout(timeout_ms=2000).policy_version == 9
    finally:
        push.close()
        ctx.term()


def test_malformed_control_requests_get_error_replies_and_the_loop_goes_on(learner, served):
    ctx, dealer = _raw_socket(zmq.DEALER, learner.control_endpoint)
    try:
        for reason, frames in _bad_messages().items():
            dealer.send_multipart(frames)
            assert dealer.poll(2000)
            reply = dealer.recv_multipart()
            assert reason in msgpack.unpackb(reply[0])["fields"]["message"]
        dealer.send_multipart(encode(Hello("late", 2, "vllm")))
        assert dealer.poll(2000)
        assert msgpack.unpackb(dealer.recv_multipart()[0])["type"] == "welcome"
    finally:
        dealer.close()
        ctx.term()
    assert sum(isinstance(m, BadMessage) for m in served.received) == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_learner_gives_a_clear_timeout():
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    actor = ActorSockets(endpoint, "lonely")
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=f"no learner at {endpoint}; is rapid-learner running"):
            actor.hello(pid=1, engine="hf", timeout_ms=300)
        assert 0.25 < time.monotonic() - start < 2.0
        with pytest.raises(RuntimeError, match="call hello\\(\\) first"):
            actor.send_rollout(_group())
    finally:
        actor.close()


def test_full_rollout_queue_blocks_the_actor_until_the_learner_reads(learner, served):
    actor = ActorSockets(learner.control_endpoint, "fast", rollout_hwm=1)
    try:
        actor.hello(pid=1, engine="hf", timeout_ms=5000)
        big = _group(t=100_000)  # ~1.6 MB per message, so kernel buffers fill quickly
        sent = 0
        while actor.send_rollout(big, timeout_ms=200):
            sent += 1
            assert sent < 100, "the queue never filled: no backpressure"
        assert sent >= 1
        # ZeroMQ gives the sender credit again once the learner has drained part
        # of its queue (its low-water mark), not after every single message.
        received = 0
        while learner.recv_rollout(timeout_ms=500) is not None:
            received += 1
        assert received == sent
        assert actor.send_rollout(big, timeout_ms=1000)
        assert learner.recv_rollout(timeout_ms=2000).completion_ids.shape == (2, 100_000)
    finally:
        actor.close()


def test_slow_subscriber_drops_updates_instead_of_blocking_the_learner(learner, actor):
    payload = b"\x00" * 1_000_000
    _wait_for(lambda: learner.publish(WeightUpdate(0, None, "snapshot", "c", "float32", payload, 1))
              or actor.recv_weights(timeout_ms=20))
    while actor.recv_weights(timeout_ms=100) is not None:
        pass
    start = time.monotonic()
    for version in range(1, 101):
        learner.publish(WeightUpdate(version, version - 1, "delta", "c", "float32", payload, 1))
    assert time.monotonic() - start < 5.0
    versions = []
    while (update := actor.recv_weights(timeout_ms=300)) is not None:
        versions.append(update.version)
    assert 1 <= len(versions) < 100 and versions == sorted(versions)


def test_non_loopback_needs_curve_or_allow_insecure():
    with pytest.raises(ValueError, match="0.0.0.0 is not a loopback address: pass CURVE keys"):
        LearnerSockets(host="0.0.0.0")
    with pytest.raises(ValueError, match="tcp://10.1.2.3:5555 is not a loopback address"):
        ActorSockets("tcp://10.1.2.3:5555", "a")
    with pytest.raises(ValueError, match="both curve_keys"):
        ActorSockets("tcp://127.0.0.1:5555", "a", server_key=b"x" * 40)


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_curve_encrypted_loopback_accepts_only_allowed_actors():
    server, good, stranger = new_curve_keys(), new_curve_keys(), new_curve_keys()
    learner = LearnerSockets(curve_keys=server, allowed_client_keys=[good.public])
    served = ControlServer(learner, {"w": torch.ones(2)}, version=1)
    actors = []
    try:
        actor = ActorSockets(learner.control_endpoint, "trusted", curve_keys=good, server_key=server.public)
        actors.append(actor)
        assert actor.hello(pid=1, engine="hf", timeout_ms=5000).policy_version == 1
        assert actor.send_rollout(_group(), timeout_ms=2000)
        assert isinstance(learner.recv_rollout(timeout_ms=2000), RolloutGroup)
        intruder = ActorSockets(learner.control_endpoint, "intruder", curve_keys=stranger, server_key=server.public)
        actors.append(intruder)
        with pytest.raises(TimeoutError, match="no learner at"):
            intruder.hello(pid=2, engine="hf", timeout_ms=500)
        assert not any(isinstance(m, Hello) and m.actor_id == "intruder" for m in served.received)
    finally:
        served.stop()
        for a in actors:
            a.close()
        learner.close()


def test_a_learner_asks_actors_it_has_not_welcomed_to_rejoin():
    """After a restart the learner knows no actor: requests get Rejoin (raised as
    LearnerRestarted), rollouts answer no grant and are dropped and counted,
    until the actor says Hello."""
    from rapid_async.config import load_config
    from rapid_async.learner.buffer import RolloutBuffer
    from rapid_async.learner.network import LearnerNetwork
    from rapid_async.learner.scheduler import WorkScheduler
    from rapid_async.wire.transport import LearnerRestarted

    cfg = load_config(overrides=["algo.group_size=2"])
    buffer = RolloutBuffer(max_staleness=4)
    scheduler = WorkScheduler("rapid-async", 8, 8, 4)
    net = LearnerNetwork(cfg, buffer, scheduler, {"learner_id": "new"})
    net.start()
    actor = ActorSockets(net.sockets.control_endpoint, "outlived")
    try:
        with pytest.raises(LearnerRestarted, match="not known to this learner"):
            actor.request_work(2, timeout_ms=5000)
        # As if the actor's PUSH had reconnected to the restarted learner by itself.
        actor._rollouts = actor._connect(zmq.PUSH, net.sockets.rollout_endpoint)
        assert actor.send_rollout(_group("outlived"), timeout_ms=2000)
        deadline = time.monotonic() + 5
        while net.counters["rollouts/dropped_ungranted"] == 0:
            assert time.monotonic() < deadline, "the group was not counted"
            time.sleep(0.02)
        assert len(buffer) == 0 and net.counters["control/rejoin_asked"] == 1
        assert actor.hello(pid=1, engine="hf", timeout_ms=5000).settings == {"learner_id": "new"}
        assert actor.request_work(2, timeout_ms=5000).prompt_indices == [0, 1]
    finally:
        actor.close()
        net.shutdown()


def test_a_port_in_use_gives_a_clear_error_instead_of_a_hang():
    taken = LearnerSockets()
    port = int(taken.control_endpoint.rsplit(":", 1)[1])
    try:
        start = time.monotonic()
        with pytest.raises(BindError, match=f"cannot bind tcp://127.0.0.1:{port}.*port {port} is in use"
                           ".*transport.port"):
            LearnerSockets(control_port=port)
        assert time.monotonic() - start < 5.0
    finally:
        taken.close()


def test_ipv6_loopback_binds_and_serves_or_fails_clearly():
    # Run in a child: before the fix a failed bind hung forever in Context.term.
    code = (
        "from rapid_async.wire.transport import ActorSockets, BindError, LearnerSockets\n"
        "try:\n"
        "    learner = LearnerSockets(host='::1')\n"
        "except BindError as exc:\n"
        "    print('CLEAR', exc); raise SystemExit(0)\n"
        "assert learner.control_endpoint.startswith('tcp://[::1]:'), learner.control_endpoint\n"
        "actor = ActorSockets(learner.control_endpoint, 'a')\n"
        "actor.send_stats({'x': 1})\n"
        "got = learner.poll_control(timeout_ms=5000)\n"
        "assert got is not None and got[1].actor_id == 'a', got\n"
        "actor.close(); learner.close(); print('SERVED')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SERVED" in out.stdout or "CLEAR cannot bind tcp://[::1]" in out.stdout


def test_a_socket_keeps_at_most_its_cap_of_connections_and_sheds_unprotected_ones_first():
    """ConnectionGuard on a real ROUTER: 40 connections against a cap of 8; the
    two protected ones (they said who they are) stay and still talk."""
    import zmq

    from rapid_async.wire.connections import ConnectionGuard

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    fd_of: dict[bytes, int] = {}
    kept: set[int] = set()
    guard = ConnectionGuard(router, "control", 8, protect=kept.__contains__,
                            on_gone=kept.discard)

    def receive_all(n):
        got = []
        while len(got) < n:
            guard.pump()
            if router.poll(50):
                frames = router.recv_multipart(copy=False)
                fd = frames[-1].get(zmq.SRCFD)
                guard.seen(fd)
                fd_of[frames[0].bytes] = fd
                got.append(frames[-1].bytes)
        return got

    try:
        friends = []
        for i in range(2):
            d = ctx.socket(zmq.DEALER)
            d.linger, d.identity = 0, b"friend%d" % i
            d.connect(f"tcp://127.0.0.1:{port}")
            d.send(b"hello")
            friends.append(d)
        receive_all(2)
        kept.update(fd_of[b"friend%d" % i] for i in range(2))
        flood = []
        for i in range(38):
            d = ctx.socket(zmq.DEALER)
            d.linger, d.reconnect_ivl = 0, -1
            d.connect(f"tcp://127.0.0.1:{port}")
            flood.append(d)
        while guard.accepted < 40:
            guard.pump()
            router.poll(20)
        guard.pump()
        assert len(guard.open) <= 8 and guard.shut_down >= 32
        assert kept <= set(guard.open)  # the protected two were never shed
        for d in friends:  # ...and still reach the router
            d.send(b"again")
        assert receive_all(2) == [b"again", b"again"]
    finally:
        guard.close()
        ctx.destroy(linger=0)
