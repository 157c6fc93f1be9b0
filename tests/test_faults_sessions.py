"""Session, grant and rejoin faults (issue 16 items 3 and 6, issue 21 items 1, 2, 3, 6).

The learner's network thread with real ZeroMQ sockets on loopback (as in
test_network.py), a real scheduler, buffer, validator and evaluation board;
hostile clients are real sockets too. The scenarios that need whole
processes (a real learner and a real rapid-actor beside a hostile client, a
resumed run that changed the task) start them with `conftest.cli`.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest
import torch
import zmq

from conftest import REPO, cli, read_log, stop, wait_for_file
from rapid_async.actor.heartbeat import Heartbeat as Heartbeat_
from rapid_async.actor.rejoin import hello_with_backoff
from rapid_async.actor.rollout import prompt_tokens
from rapid_async.config import Config
from rapid_async.learner.buffer import RolloutBuffer
from rapid_async.learner.evaluation import EvalBoard
from rapid_async.learner.limits import GrantLimits
from rapid_async.learner.network import LearnerNetwork
from rapid_async.learner.scheduler import ACCEPTED, LATE, WorkScheduler
from rapid_async.learner.validate import GroupValidator
from rapid_async.metrics import read_metrics
from rapid_async.tasks.base import get_task
from rapid_async.tasks.prompts import PromptSettings
from rapid_async.wire.protocol import (EvalTask, Heartbeat, Hello, RolloutGroup, WorkGrant,
                                       WorkRequest, decode, encode)
from rapid_async.wire.security import rollout_tag
from rapid_async.wire.transport import ActorSockets

K, MAX_NEW = 2, 6
PLAIN = PromptSettings()
CONFIG = REPO / "configs" / "quickstart.toml"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from rapid_async.tinymodel import init_model_dir

    return AutoTokenizer.from_pretrained(init_model_dir(tmp_path_factory.mktemp("m") / "m", seed=0))


@pytest.fixture
def task():
    return get_task("arithmetic", digits=2, ops="+-", seed=0)


def _net(tokenizer, task, mode="rapid-async", evals=None, **learner) -> LearnerNetwork:
    cfg = Config()
    cfg.algo.group_size, cfg.algo.max_new_tokens = K, MAX_NEW
    for key, value in {"actor_timeout_s": 5.0, **learner}.items():
        setattr(cfg.learner, key, value)
    scheduler = WorkScheduler(mode, batch_groups=4, capacity=8, max_staleness=4,
                              actor_timeout=cfg.learner.actor_timeout_s)
    if mode != "rapid-async":
        scheduler.open_round(0)
    validator = GroupValidator(K, len(tokenizer), MAX_NEW,
                               expected_prompt=lambda i: prompt_tokens(task, tokenizer, i, PLAIN))
    net = LearnerNetwork(cfg, RolloutBuffer(max_staleness=4), scheduler, {"config": {}},
                         evals=evals, validator=validator)
    net.set_published(0)
    net.start()
    return net


def _group(task, tokenizer, actor_id, index, grant_id, **overrides) -> RolloutGroup:
    if "prompt_ids" not in overrides:
        overrides["prompt_ids"] = torch.tensor(prompt_tokens(task, tokenizer, index, PLAIN),
                                               dtype=torch.int32)
    fields = dict(
        actor_id=actor_id, prompt_id=str(index), policy_version=0,
        completion_ids=torch.tensor([[5, 2], [6, 0]], dtype=torch.int32),
        completion_lengths=torch.tensor([2, 1], dtype=torch.int32),
        logprobs=torch.tensor([[-1.0, -0.5], [-2.0, 0.0]]),
        rewards=torch.tensor([1.0, 0.0]), finish_reasons=["stop", "length"], gen_seconds=0.1,
        created_at=time.time(), info={}, grant_id=grant_id)
    fields.update(overrides)
    return RolloutGroup(**fields)


def _wait(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _actor(net, actor_id="tester", session=""):
    sockets = ActorSockets(net.sockets.control_endpoint, actor_id)
    sockets.hello(os.getpid(), "none", timeout_ms=5000, session=session)
    return sockets


# ------------------------------------------------------------ issue 16 item 3


@pytest.mark.parametrize("mode", ["rapid-async", "rapid-sync"])
def test_a_reconnecting_actor_gives_back_its_grants_and_its_evaluation(mode, tokenizer, task):
    board = EvalBoard({"problems": 2, "samples": 0, "temperature": 1.0, "max_new_tokens": 4,
                       "seed": 0})
    net = _net(tokenizer, task, mode=mode, evals=board)
    old = _actor(net)
    again = None
    try:
        grant = old.request_work(4, timeout_ms=5000)
        assert len(grant.prompt_indices) == 4
        job = board.request(0, "start")
        assert old.request_work(4, timeout_ms=5000).prompt_indices == []  # round / room used up
        assert isinstance(old.recv_control(timeout_ms=5000), EvalTask)  # it took the evaluation
        assert board.status(job) == "running"
        # The actor took the learner for gone, dropped its chunk and says Hello
        # on new sockets with its secret (its heartbeats kept it alive meanwhile).
        again = _actor(net, session=old.session)
        _wait(lambda: net.sessions.released == 4)
        assert net.scheduler.in_flight() == 0 and board.status(job) == "waiting"
        redo = again.request_work(4, timeout_ms=5000)
        if not redo.prompt_indices:  # rapid-async: the released evaluation goes first
            assert isinstance(again.recv_control(timeout_ms=5000), EvalTask)
            redo = again.request_work(4, timeout_ms=5000)
        assert sorted(redo.prompt_indices) == sorted(grant.prompt_indices)  # nothing lost
        assert redo.grant_id != grant.grant_id
        for index in redo.prompt_indices:  # the round completes
            assert again.send_rollout(_group(task, tokenizer, "tester", index, redo.grant_id),
                                      timeout_ms=2000)
        late = _group(task, tokenizer, "tester", grant.prompt_indices[0], grant.grant_id)
        assert again.send_rollout(late, timeout_ms=2000)  # the old grant is over
        _wait(lambda: net.counters["rollouts/dropped_late"] == 1)
        assert len(net.buffer) == 4 and net.counters["actors/reconnected"] == 1
        # A Hello on the same connection (the actor's ping) releases nothing.
        again.hello(os.getpid(), "none", timeout_ms=5000)
        assert net.sessions.released == 4
    finally:
        old.close()
        if again is not None:
            again.close()
        net.shutdown()


# ------------------------------------------------------------ issue 21 item 6


def test_knowing_another_actors_grant_id_is_not_enough_to_deliver_for_it(tokenizer, task):
    net = _net(tokenizer, task)
    owner, thief = _actor(net, "owner"), _actor(net, "thief")
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    push.connect(net.sockets.rollout_endpoint)
    try:
        grant = owner.request_work(2, timeout_ms=5000)
        first, second = grant.prompt_indices
        forged = _group(task, tokenizer, "owner", first, grant.grant_id)
        assert thief.send_rollout(forged, timeout_ms=2000)  # signed with the thief's session
        unsigned = _group(task, tokenizer, "owner", first, grant.grant_id)
        push.send_multipart(encode(unsigned))  # no tag at all
        _wait(lambda: net.counters["rollouts/dropped_unauthenticated"] == 2)
        assert len(net.buffer) == 0 and net.scheduler.in_flight() == 2  # the grant stays live
        assert owner.send_rollout(_group(task, tokenizer, "owner", first, grant.grant_id),
                                  timeout_ms=2000)
        _wait(lambda: len(net.buffer) == 1)
        # A group that fails to decode (a tensor frame cut short) releases its
        # grant at once, when its readable header is signed by the owner...
        good = _group(task, tokenizer, "owner", second, grant.grant_id)
        good.session_tag = rollout_tag(owner.session, "owner", str(second), grant.grant_id)
        frames = encode(good)
        broken = [frames[0], frames[1][:2], *frames[2:]]
        header = msgpack.unpackb(frames[0])
        header["fields"]["session_tag"] = rollout_tag(thief.session, "owner", str(second),
                                                      grant.grant_id)
        push.send_multipart([msgpack.packb(header), frames[1][:2], *frames[2:]])  # ...not the thief
        _wait(lambda: net.bad_messages["rollouts"] == 1)
        assert net.scheduler.in_flight() == 1
        push.send_multipart(broken)
        _wait(lambda: net.counters["rollouts/released_undecodable"] == 1)
        assert net.scheduler.in_flight() == 0 and net.scheduler.reissued == 1
        assert owner.request_work(1, timeout_ms=5000).prompt_indices == [second]
    finally:
        ctx.destroy(linger=0)
        owner.close()
        thief.close()
        net.shutdown()


# ------------------------------------------------------------ issue 21 item 1 (rules)


def test_an_actor_that_never_delivers_holds_at_most_half_and_loses_it_at_the_deadline():
    limits = GrantLimits(max_per_actor=0, timeout_factor=3.0, timeout_min_s=0.3)
    s = WorkScheduler("rapid-async", batch_groups=8, capacity=8, max_staleness=4, limits=limits)
    hoard = s.grant("hoarder", 10**6, buffered=0, version=0)
    assert len(hoard.indices) == 4  # unproven: half of the capacity
    assert s.grant("hoarder", 10**6, 0, 0).indices == []
    assert len(s.grant("newcomer", 10**6, 0, 0).indices) == 0  # unproven pool used up
    time.sleep(0.35)
    s.seen("hoarder")  # heartbeats do not keep work past its deadline
    assert s.take_back_overdue() == {"hoarder": 4} and s.taken_back == 4
    assert s.delivered("hoarder", hoard.indices[0], hoard.grant_id) == LATE
    worker = s.grant("worker", 4, 0, 0)
    assert sorted(worker.indices) == sorted(hoard.indices)  # reissued to another actor
    for i in worker.indices:
        assert s.delivered("worker", i, worker.grant_id) == ACCEPTED
    # A proven actor alone gets the whole capacity; with a second proven
    # actor alive, each gets its share.
    assert len(s.grant("worker", 10**6, 0, 0).indices) == 8
    solo = WorkScheduler("rapid-sync", batch_groups=6, capacity=8, max_staleness=1, limits=limits)
    solo.open_round(0)
    first = solo.grant("a", 2, 0, 0)
    second = solo.grant("b", 2, 0, 0)
    assert len(first.indices) == 2 and len(second.indices) == 1  # unproven pool: ceil(6 / 2)
    assert solo.delivered("a", first.indices[0], first.grant_id) == ACCEPTED
    assert solo.delivered("b", second.indices[0], second.grant_id) == ACCEPTED
    assert len(solo.grant("a", 10, 0, 0).indices) == 2  # share: ceil(6 / 2) - 1 held
    # The deadline follows the measured generation time, above the floor.
    assert s.run_spg > 0 and limits.deadline_s(4, 10.0, 0.0) == 120.0
    assert limits.deadline_s(4, 0.0, 0.0) == 0.3
    assert GrantLimits().deadline_s(4, 1.0, 1.0) == float("inf")


# ------------------------------------------------------------ issue 21 item 2


def _connections(port: int) -> int:
    """Established TCP connections whose local end is `port` (the learner's
    side of its control connections): one file descriptor each."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            for line in open(table).readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                n += int(local.rsplit(":", 1)[1], 16) == port and state == "01"
    return n


def test_a_flood_of_hellos_does_not_lock_out_an_actor_that_delivers(tokenizer, task):
    net = _net(tokenizer, task, max_actors=32, actor_timeout_s=2.0)
    worker = _actor(net, "worker")
    beat = Heartbeat_(SimpleNamespace(sockets=worker, session=worker.session), interval_s=0.2)
    beat.start()  # a real actor's heartbeat thread: it is alive, delivering or not
    ctx = zmq.Context()
    ctx.MAX_SOCKETS = 4096
    try:
        grant = worker.request_work(1, timeout_ms=5000)
        assert worker.send_rollout(_group(task, tokenizer, "worker", grant.prompt_indices[0],
                                          grant.grant_id), timeout_ms=2000)
        _wait(lambda: len(net.buffer) == 1)
        port = int(net.sockets.control_endpoint.rsplit(":", 1)[1])
        cap = net.sockets.guards["control"].max_connections
        assert cap == 2 * 32 + 32
        flood = []
        for i in range(3000):  # 3,000 Hellos with new ids, one connection each
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.reconnect_ivl = -1  # (a flooder that reconnects is shut down again each time)
            sock.connect(net.sockets.control_endpoint)
            sock.send_multipart(encode(Hello(f"flood-{i}", i, "none")))
            flood.append(sock)
        guard = net.sockets.guards["control"]
        _wait(lambda: guard.accepted >= 3000, timeout_s=120)  # every connection seen
        # The learner keeps at most `cap` of them: the least recently active
        # without a session were shut down (the 5,025 descriptors of the issue
        # were one per connection the flooder held open).
        _wait(lambda: _connections(port) <= cap, timeout_s=60)
        assert guard.shut_down >= 3000 - cap
        # every Hello that got through has been answered (checked on the network thread)
        _wait(lambda: not net.call(lambda: net.sockets._control.poll(0, zmq.POLLIN)),
              timeout_s=120)
        sessions = {}
        for i, sock in enumerate(flood):  # the replies that did arrive...
            if sock.poll(0):
                sessions[i] = decode(sock.recv_multipart()).session
        for i, session in sessions.items():  # ...keep those sessions alive with heartbeats
            if session:
                flood[i].send_multipart(encode(Heartbeat(f"flood-{i}", session)))
        assert len(net.sessions) <= 32 and "worker" in net.sessions
        newcomer = _actor(net, "newcomer")  # a new real actor still gets in
        assert "newcomer" in net.sessions and "worker" in net.sessions
        assert worker.request_work(1, timeout_ms=5000).prompt_indices  # still served
        assert newcomer.request_work(1, timeout_ms=5000) is not None
        newcomer.close()
        for sock in flood:
            sock.close()
        _wait(lambda: _connections(port) <= 2, timeout_s=60)
    finally:
        beat.stop()
        ctx.destroy(linger=0)
        worker.close()
        net.shutdown()


def test_a_refused_actor_asks_again_with_backoff(tokenizer, task):
    net = _net(tokenizer, task, max_actors=1, actor_timeout_s=60.0)
    worker = _actor(net, "worker")
    try:
        grant = worker.request_work(1, timeout_ms=5000)
        assert worker.send_rollout(_group(task, tokenizer, "worker", grant.prompt_indices[0],
                                          grant.grant_id), timeout_ms=2000)
        _wait(lambda: len(net.buffer) == 1)
        waiting = ActorSockets(net.sockets.control_endpoint, "waiting")
        with pytest.raises(TimeoutError, match="all delivered recently; retry later"):
            hello_with_backoff(waiting, "waiting", "none", timeout_ms=5000, patience_s=1.2)
        refusals = net.bad_messages["control"]
        assert refusals >= 2  # asked more than once

        def leave():  # the worker leaves while the newcomer waits
            _wait(lambda: net.bad_messages["control"] > refusals)
            worker.send_stats({"leaving": 1})

        leaver = threading.Thread(target=leave)
        leaver.start()
        welcome = hello_with_backoff(waiting, "waiting", "none", timeout_ms=5000, patience_s=60)
        leaver.join()
        assert welcome.session and "waiting" in net.sessions
        waiting.close()
    finally:
        worker.close()
        net.shutdown()


# ------------------------------------------------------------ processes


def _learner(tmp_path: Path, model_dir: Path, overrides: list[str], name="learner",
             resume=False):
    run_dir = tmp_path / "run"
    args = ["learner", "--config", str(CONFIG), "--model-dir", str(model_dir),
            "--set", f"run.run_dir={run_dir}", *sum((["--set", o] for o in overrides), [])]
    proc = cli(*args, *(["--resume"] if resume else []), log=tmp_path / f"{name}.log")
    return proc, run_dir


def _steps(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["role"] == "learner" and "loss/policy" in r]


@pytest.mark.slow
def test_a_hoarding_client_beside_a_real_actor_cannot_stop_training(tmp_path, random_model_dir):
    """issue 21 item 1: one client says Hello, asks for 10^6 prompts again and
    again and heartbeats, but never delivers. Before, it held every buffer
    slot and the learner made no step."""
    steps = 8
    learner, run_dir = _learner(tmp_path, random_model_dir, [
        "run.mode=rapid-async", f"run.max_steps={steps}", "run.eval_every=0", "run.eval_size=5",
        "run.eval_timeout_s=2", "algo.group_size=2", "learner.minibatch_groups=2",
        "learner.buffer_groups=8", "actor.chunk_groups=2", "learner.grant_timeout_min_s=2",
        "learner.actor_timeout_s=30"])
    ctx = zmq.Context()
    procs = [learner]
    done = threading.Event()
    try:
        info = wait_for_file(run_dir / "learner.json", learner)
        control = ctx.socket(zmq.DEALER)
        control.linger = 0
        control.connect(info["control"])
        control.send_multipart(encode(Hello("hoarder", 1, "none")))
        assert control.poll(20_000)
        session = decode(control.recv_multipart()).session
        held: list[WorkGrant] = []  # every grant it got

        def hoard():
            while not done.is_set():
                control.send_multipart(encode(WorkRequest("hoarder", 10**6)))
                control.send_multipart(encode(Heartbeat("hoarder", session)))
                while control.poll(200):
                    reply = decode(control.recv_multipart())
                    if isinstance(reply, WorkGrant) and reply.prompt_indices:
                        held.append(reply)

        thread = threading.Thread(target=hoard, daemon=True)
        thread.start()
        _wait(lambda: held, timeout_s=60)  # it holds work before the actor comes
        actor = cli("actor", "--learner", info["control"], "--actor-id", "real",
                    log=tmp_path / "actor.log")
        procs.append(actor)
        _wait(lambda: "actor hoarder held" in read_log(tmp_path / "learner.log"), timeout_s=240)
        # Its work was taken back: delivering it now is late, dropped and counted.
        index, grant_id = held[0].prompt_indices[0], held[0].grant_id
        push = ctx.socket(zmq.PUSH)
        push.linger = 1000
        push.connect(info["rollouts"])
        late = _group(get_task("arithmetic", digits=2, ops="+-", seed=0), None, "hoarder", index,
                      grant_id, prompt_ids=torch.tensor([1, 2, 3], dtype=torch.int32))
        late.session_tag = rollout_tag(session, "hoarder", str(index), grant_id)
        push.send_multipart(encode(late))
        assert learner.wait(timeout=240) == 0, read_log(tmp_path / "learner.log")[-3000:]
        done.set()
        thread.join(timeout=5)
        assert actor.wait(timeout=60) == 0, read_log(tmp_path / "actor.log")[-3000:]
    finally:
        done.set()
        ctx.destroy(linger=0)
        for p in procs:
            stop(p)
    records = _steps(run_dir)
    assert [r["version"] for r in records] == list(range(1, steps + 1))
    end = [r for r in read_metrics(run_dir) if r.get("event") == "end"][-1]
    assert end["scheduler/taken_back"] >= 1 and end["net/rollouts/dropped_late"] >= 1
    assert len(held[0].prompt_indices) == 4  # at most half the buffer, asking for 10^6
    assert "Traceback" not in read_log(tmp_path / "learner.log")


def test_a_learner_that_rejects_every_group_says_so_and_stops(tmp_path, random_model_dir):
    """issue 21 item 3: groups that can never be trained on (here a client
    whose prompts are not the task's) made the learner spin for ever."""
    learner, run_dir = _learner(tmp_path, random_model_dir, [
        "run.max_steps=100", "run.eval_every=0", "run.eval_size=5", "run.eval_timeout_s=2",
        "algo.group_size=2", "learner.stop_after_rejected_s=1",
        "learner.stop_after_rejected_groups=20"])
    ctx = zmq.Context()
    sent = 0
    try:
        info = wait_for_file(run_dir / "learner.json", learner)
        sockets = ActorSockets(info["control"], "confused")
        sockets.hello(os.getpid(), "none", timeout_ms=20_000)
        while learner.poll() is None and sent < 2000:
            try:
                grant = sockets.request_work(4, timeout_ms=5000)
            except (TimeoutError, RuntimeError):  # the learner is stopping
                continue
            for index in grant.prompt_indices:
                group = _group(None, None, "confused", index, grant.grant_id,
                               prompt_ids=torch.tensor([3, 4, 5], dtype=torch.int32))
                sockets.send_rollout(group, timeout_ms=2000)
                sent += 1
            sockets.recv_control(timeout_ms=20)
        learner.wait(timeout=120)
        sockets.close()
    finally:
        ctx.destroy(linger=0)
        stop(learner)
    log = read_log(tmp_path / "learner.log")
    assert learner.returncode == 3, log[-3000:]
    assert "every group that answered a grant" in log and "prompt_mismatch" in log
    assert "Traceback" not in log
    end = [r for r in read_metrics(run_dir) if r.get("event") == "end"]
    assert end and end[-1]["stop_reason"].startswith("error: NoUsableGroups")
    assert end[-1]["net/rollouts/rejected_prompt_mismatch"] >= 20


@pytest.mark.slow
def test_an_actor_that_outlives_its_learner_takes_the_resumed_runs_task(tmp_path,
                                                                         random_model_dir):
    """issue 16 item 6 / issue 21 item 3: `--resume --set task.options.seed=7`
    changes every prompt; the old actor kept its task and all its groups were
    rejected as prompt_mismatch (0 steps, both exit 0). Now it rebuilds its
    task, prompt settings and scorer from the Welcome config."""
    steps = 24
    common = ["run.mode=rapid-async", f"run.max_steps={steps}", "run.checkpoint_every=4",
              "run.checkpoint_minutes=0", "run.eval_every=0", "run.eval_size=5",
              "run.eval_timeout_s=5", "algo.group_size=2", "learner.minibatch_groups=2",
              "learner.buffer_groups=6", "actor.chunk_groups=2", "actor.learner_timeout_s=3"]
    first, run_dir = _learner(tmp_path, random_model_dir, common, name="learner1")
    procs = [first]
    try:
        info = wait_for_file(run_dir / "learner.json", first)
        actor = cli("actor", "--learner", info["control"], "--actor-id", "old",
                    log=tmp_path / "actor.log")
        procs.append(actor)
        _wait(lambda: list(run_dir.glob("checkpoints/step-*/rapid_checkpoint.json")),
              timeout_s=240)
        first.kill()  # SIGKILL, a child we started, by pid
        first.wait()
        second, _ = _learner(tmp_path, random_model_dir, common + ["task.options.seed=7"],
                             name="learner2", resume=True)
        procs.append(second)
        assert second.wait(timeout=300) == 0, read_log(tmp_path / "learner2.log")[-3000:]
        assert actor.wait(timeout=60) == 0, read_log(tmp_path / "actor.log")[-3000:]
    finally:
        for p in procs:
            stop(p)
    records = read_metrics(run_dir)
    resume = [r for r in records if r.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["resume/changed"]["task.options"]
    after = [r for r in _steps(run_dir) if r["version"] > resume[0]["version"]]
    assert [r["version"] for r in after] == list(range(resume[0]["version"] + 1, steps + 1))
    assert after[-1].get("net/rollouts/rejected_prompt_mismatch", 0) == 0
    old = [r for r in records if r.get("actor_id") == "old"]
    assert old[-1]["actor/reconfigured"] >= 1 and old[-1]["version"] == steps
    assert "rebuilding the task" in read_log(tmp_path / "actor.log")
