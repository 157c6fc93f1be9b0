"""Tests of rapid_async.learner.network: the learner's network thread with real
ZeroMQ sockets on loopback, a real buffer, scheduler and validator (tiny model's
tokenizer, arithmetic task), and actors played by real ActorSockets: intake of
groups, actor sessions, heartbeats, bounded state; and weight serving (snapshots
built by a real publisher thread, never on the network thread, and the chain of
recent deltas)."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest
import torch
import zmq

from rapid_async.actor.heartbeat import Heartbeat
from rapid_async.actor.rollout import prompt_tokens
from rapid_async.config import Config, load_config
from rapid_async.tasks.prompts import PromptSettings
from rapid_async.tinymodel import build_model
from rapid_async.weights import apply_update
from rapid_async.weights.publisher import WeightPublisher
from rapid_async.learner.buffer import RolloutBuffer
from rapid_async.learner.network import LearnerNetwork, chain_budget
from rapid_async.learner.scheduler import WorkScheduler
from rapid_async.learner.validate import MIN_BEHAVIOUR_LOGPROB, GroupValidator
from rapid_async.tasks.base import get_task
from rapid_async.wire.protocol import ActorStats, Hello, RolloutGroup, WorkRequest, encode
from rapid_async.wire.transport import ActorSockets

K, MAX_NEW = 2, 6
PLAIN = PromptSettings()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from rapid_async.tinymodel import init_model_dir

    return AutoTokenizer.from_pretrained(init_model_dir(tmp_path_factory.mktemp("m") / "m", seed=0))


@pytest.fixture
def task():
    return get_task("arithmetic", digits=2, ops="+-", seed=0)


def _net(tokenizer, task, **learner):
    cfg = Config()
    cfg.algo.group_size, cfg.algo.max_new_tokens = K, MAX_NEW
    cfg.actor.heartbeat_s = 0.1
    for key, value in {"actor_timeout_s": 0.6, **learner}.items():
        setattr(cfg.learner, key, value)
    buffer = RolloutBuffer(max_staleness=4)
    scheduler = WorkScheduler("rapid-async", batch_groups=8, capacity=64, max_staleness=4,
                              actor_timeout=cfg.learner.actor_timeout_s, forget_after=3.0)
    validator = GroupValidator(K, len(tokenizer), MAX_NEW,
                               expected_prompt=lambda i: prompt_tokens(task, tokenizer, i, PLAIN))
    net = LearnerNetwork(cfg, buffer, scheduler, {"config": {}}, validator=validator)
    net.set_published(0)
    net.start()
    return net


@pytest.fixture
def net(tokenizer, task):
    n = _net(tokenizer, task)
    yield n
    n.shutdown()


class ByHand:
    """An actor played by hand: real sockets, groups built for its grants."""

    def __init__(self, net, task, tokenizer, actor_id="tester"):
        self.net, self.task, self.tokenizer = net, task, tokenizer
        self.sockets = ActorSockets(net.sockets.control_endpoint, actor_id)
        self.welcome = self.sockets.hello(os.getpid(), "none", timeout_ms=5000)
        self.session = self.welcome.session
        self.actor_id = actor_id

    def group(self, index, grant_id, **overrides) -> RolloutGroup:
        fields = dict(
            actor_id=self.actor_id, prompt_id=str(index), policy_version=0,
            prompt_ids=torch.tensor(prompt_tokens(self.task, self.tokenizer, index, PLAIN),
                                   dtype=torch.int32),
            completion_ids=torch.tensor([[5, 2], [6, 0]], dtype=torch.int32),
            completion_lengths=torch.tensor([2, 1], dtype=torch.int32),
            logprobs=torch.tensor([[-1.0, -0.5], [-2.0, 0.0]]),
            rewards=torch.tensor([1.0, 0.0]), finish_reasons=["stop", "length"], gen_seconds=0.1,
            created_at=time.time(), info={}, grant_id=grant_id)
        fields.update(overrides)
        return RolloutGroup(**fields)

    def send(self, group) -> None:
        assert self.sockets.send_rollout(group, timeout_ms=2000)

    def close(self):
        self.sockets.close()


@pytest.fixture
def tester(net, task, tokenizer):
    t = ByHand(net, task, tokenizer)
    yield t
    t.close()


def _wait(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _long(t: int) -> dict:
    ids = torch.full((K, t), 5, dtype=torch.int32)
    return dict(completion_ids=ids, completion_lengths=torch.tensor([t, t], dtype=torch.int32),
                logprobs=torch.full((K, t), -0.5))


# Each was a crash, an OOM or a NaN of the learner before the learner checked
# groups against the model and the grant (issue 9, item 3).
POISON = {
    "completion_empty": dict(completion_lengths=torch.tensor([2, 0], dtype=torch.int32),
                             logprobs=torch.tensor([[-1.0, -0.5], [0.0, 0.0]]),
                             completion_ids=torch.tensor([[5, 2], [0, 0]], dtype=torch.int32)),
    "prompt_empty": dict(prompt_ids=torch.zeros(0, dtype=torch.int32)),
    "prompt_mismatch": dict(prompt_ids=torch.tensor([1, 7, 7], dtype=torch.int32)),
    "token_range": dict(completion_ids=torch.tensor([[5, 2], [10**6, 0]], dtype=torch.int32)),
    "completion_too_long": _long(1024),
    "version_future": dict(policy_version=7),
    "logprob_range": dict(logprobs=torch.tensor([[-1.0, -1e4], [-2.0, 0.0]])),
    "group_size": dict(completion_ids=torch.tensor([[5], [6], [7]], dtype=torch.int32),
                       completion_lengths=torch.tensor([1, 1, 1], dtype=torch.int32),
                       logprobs=torch.full((3, 1), -0.5), rewards=torch.tensor([1.0, 0.0, 0.0]),
                       finish_reasons=["stop"] * 3),
    "reward_range": dict(rewards=torch.tensor([1e30, 0.0])),
}


@pytest.mark.parametrize("reason", list(POISON))
def test_a_poison_group_is_rejected_counted_and_its_prompt_goes_out_again(reason, net, tester):
    grant = tester.sockets.request_work(1, timeout_ms=5000)
    index = grant.prompt_indices[0]
    tester.send(tester.group(index, grant.grant_id, **POISON[reason]))
    _wait(lambda: net.counters[f"rollouts/rejected_{reason}"] == 1)
    assert len(net.buffer) == 0 and net.scheduler.reissued == 1
    again = tester.sockets.request_work(1, timeout_ms=5000)
    assert again.prompt_indices == [index] and again.grant_id != grant.grant_id
    tester.send(tester.group(index, again.grant_id))  # the honest redo is trained
    _wait(lambda: len(net.buffer) == 1)
    assert net.error is None and net.is_alive()


def test_the_behaviour_logprob_bound_is_inclusive(net, tester):
    grant = tester.sockets.request_work(1, timeout_ms=5000)
    lps = torch.tensor([[MIN_BEHAVIOUR_LOGPROB, -0.5], [-2.0, 0.0]])
    tester.send(tester.group(grant.prompt_indices[0], grant.grant_id, logprobs=lps))
    _wait(lambda: len(net.buffer) == 1)


def test_duplicates_late_and_ungranted_groups_are_dropped_and_counted(net, tester):
    grant = tester.sockets.request_work(2, timeout_ms=5000)
    first, second = grant.prompt_indices
    tester.send(tester.group(first, grant.grant_id))
    tester.send(tester.group(first, grant.grant_id))  # the same work again
    tester.send(tester.group(second, grant.grant_id + 1))  # a grant nobody made
    tester.send(tester.group(50, grant.grant_id))  # a prompt not in the grant
    tester.send(tester.group(second, grant.grant_id, prompt_id="x7"))  # not a prompt index
    _wait(lambda: net.counters["rollouts/dropped_ungranted"] == 3)
    assert net.counters["rollouts/dropped_duplicate"] == 1
    assert net.counters["rollouts/groups"] == 1 and len(net.buffer) == 1
    net.scheduler.forget("tester")  # as if it had been silent: its work is reissued
    tester.send(tester.group(second, grant.grant_id))
    _wait(lambda: net.counters["rollouts/dropped_late"] == 1)
    assert len(net.buffer) == 1


def _raw_dealer(endpoint):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    return ctx, sock


def test_leaving_only_affects_the_senders_own_work(net, tester):
    # issue 9, item 4: an ActorStats {"leaving": 1} naming any actor made the
    # learner forget that actor's work.
    grant = tester.sockets.request_work(2, timeout_ms=5000)
    ctx, other = _raw_dealer(net.sockets.control_endpoint)
    try:
        other.send_multipart(encode(ActorStats("tester", {"leaving": 1})))
        other.send_multipart(encode(WorkRequest("tester", 5)))
        assert other.poll(5000)
        reply = other.recv_multipart()
        assert b"unknown on this connection" in reply[0]
        assert other.poll(5000)
        assert b"unknown on this connection" in other.recv_multipart()[0]
    finally:
        other.close()
        ctx.term()
    assert net.bad_messages["control"] == 2
    assert net.scheduler.in_flight() == 2 and net.scheduler.reissued == 0
    for index in grant.prompt_indices:
        tester.send(tester.group(index, grant.grant_id))
    _wait(lambda: len(net.buffer) == 2)
    tester.sockets.send_stats({"leaving": 1})  # its own goodbye works
    _wait(lambda: "tester" not in net.sessions)


def test_a_second_actor_cannot_take_a_live_actors_id(net, tester):
    intruder = ActorSockets(net.sockets.control_endpoint, "tester")
    try:
        with pytest.raises(RuntimeError, match="in use by a live actor"):
            intruder.hello(1, "none", timeout_ms=5000)
    finally:
        intruder.close()
    assert net.sessions["tester"].identity != b""
    assert tester.sockets.request_work(1, timeout_ms=5000).prompt_indices == [0]


def test_an_actor_that_reconnects_keeps_its_session_with_its_secret(net, tester):
    # An actor that opens new sockets (it took the learner for gone) proves
    # with its session secret that it is the same actor; a wrong secret is
    # refused like any other use of a live actor's id.
    wrong = ActorSockets(net.sockets.control_endpoint, "tester")
    again = ActorSockets(net.sockets.control_endpoint, "tester")
    try:
        with pytest.raises(RuntimeError, match="in use by a live actor"):
            wrong.hello(1, "none", timeout_ms=5000, session="0" * 32)
        welcome = again.hello(1, "none", timeout_ms=5000, session=tester.session)
        assert welcome.session == tester.session
        assert again.request_work(1, timeout_ms=5000).prompt_indices == [0]
        with pytest.raises(RuntimeError, match="unknown on this connection"):
            tester.sockets.request_work(1, timeout_ms=5000)  # the old connection is unbound
    finally:
        wrong.close()
        again.close()


def test_heartbeats_keep_a_slow_actor_alive_and_need_its_session(tokenizer, task):
    # issue 9, item 1: an actor generating for longer than actor_timeout_s
    # (2 s here, so that a loaded machine's stalls of a beat stay inside it)
    # was taken for gone, its prompts reissued, and its late deliveries
    # trained as well.
    net = _net(tokenizer, task, actor_timeout_s=2.0)
    tester = ByHand(net, task, tokenizer)
    try:
        _slow_actor_and_forged_heartbeats(net, tester)
    finally:
        tester.close()
        net.shutdown()


def _slow_actor_and_forged_heartbeats(net, tester) -> None:
    grant = tester.sockets.request_work(2, timeout_ms=5000)
    beat = Heartbeat(tester, interval_s=0.1)
    beat.start()
    try:
        time.sleep(3.0)  # "generating" for 1.5 timeouts: the main socket stays silent
    finally:
        beat.stop()
    assert beat.sent >= 10 and net.counters["control/heartbeats"] >= 10
    assert net.scheduler.reissued == 0 and net.counters["actors/expired"] == 0
    for index in grant.prompt_indices:
        tester.send(tester.group(index, grant.grant_id))
    _wait(lambda: len(net.buffer) == 2)
    # A heartbeat without the session secret keeps nobody alive.
    forger = Heartbeat(SimpleNamespace(sockets=tester.sockets, session="guess"), interval_s=0.1)
    grant = tester.sockets.request_work(1, timeout_ms=5000)
    forger.start()
    try:
        _wait(lambda: net.counters["actors/expired"] == 1, timeout_s=30)
    finally:
        forger.stop()
    assert net.scheduler.reissued == 1 and net.bad_messages["control"] >= 1


def test_learner_state_stays_bounded_under_many_drive_by_actors(tokenizer, task):
    # issue 21 item 2: drive-by Hellos filled the sessions and locked out
    # real actors. Now each newcomer forgets the session that delivered least
    # recently (never delivered first, oldest first), and one that delivered
    # recently is never forgotten for a newcomer.
    net = _net(tokenizer, task, max_actors=8)
    worker = ByHand(net, task, tokenizer, actor_id="worker")
    ctx = zmq.Context()
    try:
        grant = worker.sockets.request_work(1, timeout_ms=5000)
        worker.send(worker.group(grant.prompt_indices[0], grant.grant_id))
        _wait(lambda: len(net.buffer) == 1)
        socks = []
        for i in range(40):  # 40 connections, each saying Hello as a new actor
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(net.sockets.control_endpoint)
            sock.send_multipart(encode(Hello(f"drive-by-{i}", i, "none")))
            # One at a time: the learner fair-queues across connections, so
            # Hellos sent together may arrive in any order, and which seven
            # are newest would then depend on scheduling.
            assert sock.poll(30000)
            sock.recv_multipart()
            socks.append(sock)
        assert len(net.sessions) == 8 and "worker" in net.sessions
        assert net.sessions.evicted == 33 and net.bad_messages["control"] == 0
        assert [f"drive-by-{i}" in net.sessions for i in range(33, 40)] == [True] * 7
        late = ActorSockets(net.sockets.control_endpoint, "late")
        try:
            assert late.hello(1, "none", timeout_ms=5000).session
        finally:
            late.close()
        assert len(net.sessions) == 8 and "late" in net.sessions and "worker" in net.sessions
        _wait(lambda: len(net.sessions) <= 2, timeout_s=8)  # forget_after = 3 s
        assert len(net.scheduler.actors()) <= 2
    finally:
        worker.close()
        ctx.destroy(linger=0)
        net.shutdown()


# ---------------------------------------------------------------- weight serving

def serve(chain_mb: int = 512):
    cfg = load_config(overrides=[f"transport.delta_chain_mb={chain_mb}", "model.inference_dtype=bfloat16"])
    net = LearnerNetwork(cfg, RolloutBuffer(2), WorkScheduler("rapid-async", 8, 8, 2), {"x": 1})
    model = build_model(seed=0)
    publisher = WeightPublisher(model, "bfloat16", on_update=lambda u, s: net.publish(u),
                                on_snapshot=net.snapshot_ready)
    publisher.begin(0)
    net.set_published(0)
    net.weights_source = publisher
    net.start()
    actor = ActorSockets(net.sockets.control_endpoint, "a0")
    actor.hello(os.getpid(), "hf", timeout_ms=5000)
    return net, publisher, model, actor


def step(model, publisher, version: int) -> dict:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    publisher.stage(version)
    assert publisher.wait_published(version, timeout=30)
    return {n: p.detach().to(torch.bfloat16) for n, p in model.named_parameters()}


def close(net, publisher, actor) -> None:
    actor.close()
    net.shutdown()
    publisher.close()


def test_snapshots_come_from_the_publisher_and_deltas_from_the_chain():
    net, publisher, model, actor = serve()
    try:
        snapshot = actor.request_snapshot("join", timeout_ms=10_000)  # built on request
        assert snapshot.kind == "snapshot" and snapshot.version == 0
        state = apply_update(None, None, snapshot)
        expected = [step(model, publisher, v) for v in (1, 2, 3)]
        time.sleep(0.2)  # the network thread sends and keeps them
        for version in (1, 2, 3):
            delta = actor.request_delta(version - 1, timeout_ms=5000)
            assert (delta.base_version, delta.version) == (version - 1, version)
            state = apply_update(state, version - 1, delta)
        assert all(torch.equal(state[n], expected[-1][n]) for n in state)
        assert actor.request_snapshot("again", timeout_ms=10_000).version == 3
        assert net.counters["weights/chain_served"] == 3
        assert net.counters["weights/snapshots_served"] == 2
        with pytest.raises(RuntimeError, match="no kept delta starts at version 3"):
            actor.request_delta(3, timeout_ms=5000)
    finally:
        close(net, publisher, actor)


def test_the_chain_keeps_no_more_than_its_byte_budget():
    net, publisher, model, actor = serve(chain_mb=0)
    try:
        step(model, publisher, 1)
        time.sleep(0.2)
        with pytest.raises(RuntimeError, match="ask for a snapshot"):
            actor.request_delta(0, timeout_ms=5000)
    finally:
        close(net, publisher, actor)


def test_the_chain_budget_is_capped_at_one_state():
    assert chain_budget(512) == 512 * 2**20
    assert chain_budget(512, state_bytes=2_000_000) == 2_000_000  # a tiny model
    assert chain_budget(512, state_bytes=988 * 10**6) == 512 * 2**20  # Qwen2.5-0.5B in bf16
    assert chain_budget(0, state_bytes=10) == 0


def test_a_delta_older_than_one_state_of_deltas_needs_a_snapshot():
    net, publisher, model, actor = serve()
    try:
        net.limit_chain(publisher.layout.nbytes)
        assert 0 < net.chain_limit_bytes == publisher.layout.nbytes  # far below 512 MiB
        version = 0
        while version < 200 and not (net._chain and net._chain[0].base_version > 0):
            version += 1
            step(model, publisher, version)  # every value changes
            time.sleep(0.05)  # the network thread keeps it
        assert net._chain[0].base_version > 0, "the chain never dropped its oldest delta"
        assert sum(len(u.payload) for u in net._chain) <= publisher.layout.nbytes
        with pytest.raises(RuntimeError, match="ask for a snapshot"):
            actor.request_delta(0, timeout_ms=5000)
        assert actor.request_delta(version - 1, timeout_ms=5000).version == version
    finally:
        close(net, publisher, actor)
