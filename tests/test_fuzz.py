"""Fuzzing: hostile input to every socket the learner binds and to an actor's connections.

Real processes on loopback (rapid-learner, rapid-actor, the tiny random model).
The fuzzer sends random frames, truncated, bit-flipped and oversized messages,
wrong protocol versions, valid messages of the wrong type or from a connection
that may not send them, groups for real grants with invalid fields, and raw
bytes that are not ZeroMQ at all. Checks: no process dies, training goes on,
every malformed message is counted where it arrived, memory stays flat.

The actor side gets the same on its control connection and, on its weights
subscription, corrupt and forged weight updates including a decompression
bomb (the payload checks themselves are unit-tested in
test_weights_receiver.py; here they arrive at a running actor among
everything else).
"""

from __future__ import annotations

import dataclasses
import random
import socket
import struct
import threading
import time
from pathlib import Path

import msgpack
import psutil
import pytest
import torch
import zmq

from conftest import REPO, cli, read_log, stop, wait_for_file
from rapid_async.metrics import read_metrics
from rapid_async.wire import protocol
from rapid_async.wire.protocol import (ActorStats, DeltaRequest, ErrorReply, Heartbeat, Hello,
                                       RolloutGroup,
                                       SnapshotRequest, Stop, WeightUpdate, Welcome, WorkGrant,
                                       WorkRequest, encode)
from rapid_async.wire.security import rollout_tag
from rapid_async.wire.transport import MAX_INBOUND_BYTES, LearnerSockets

CONFIG = REPO / "configs" / "quickstart.toml"
LEARNER_FUZZ = {"control": 500, "rollouts": 500, "invalid": 30}
"""Messages of each kind the learner's fuzzer sends before it checks the counts."""
ACTOR_FUZZ = 250
"""Garbage messages the hostile learner sends an actor on each connection."""
FUZZ_LIMIT_S = 300.0
"""Upper bound on a fuzzing phase on a slow machine (a hang, not a rate)."""
RUN = ["run.mode=rapid-async", "run.max_steps=1000000", "run.eval_every=0", "run.eval_size=5",
       "run.checkpoint_every=0", "run.checkpoint_minutes=0", "algo.group_size=2",
       "algo.max_new_tokens=4", "learner.minibatch_groups=2", "learner.buffer_groups=8",
       "actor.chunk_groups=2", "learner.max_actors=64"]


# ---------------------------------------------------------------- message makers


def _group(rng: random.Random, **overrides) -> RolloutGroup:
    fields = dict(actor_id="fuzzer", prompt_id=str(rng.randrange(100)), policy_version=0,
                  prompt_ids=torch.tensor([1, 7, 8, 15, 13], dtype=torch.int32),
                  completion_ids=torch.tensor([[5, 2], [6, 2]], dtype=torch.int32),
                  completion_lengths=torch.tensor([2, 2], dtype=torch.int32),
                  logprobs=torch.tensor([[-1.0, -0.5], [-2.0, -0.1]]),
                  rewards=torch.tensor([1.0, 0.0]), finish_reasons=["stop", "stop"],
                  gen_seconds=0.1, created_at=time.time(), info={},
                  grant_id=rng.randrange(1, 2**62))
    fields.update(overrides)
    return RolloutGroup(**fields)


def _valid_messages(rng: random.Random) -> list[list[bytes]]:
    """Well-formed messages of every type: the raw material of mutations."""
    return [encode(m) for m in (
        Hello(f"drive-by-{rng.randrange(10**6)}", 1, "hf"), WorkRequest("nobody", 3),
        ActorStats("honest", {"leaving": 1}), Heartbeat("honest", "guess"),
        SnapshotRequest("honest", "x"), DeltaRequest("nobody", 0), Stop("now"),
        WorkGrant([1, 2], 0, 5), Welcome("a", "b", 0, {}), _group(rng),
        WeightUpdate(1, 0, "delta", "sha256:0", "float32", rng.randbytes(64), 64))]


def _mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    """One hostile variant of a valid message."""
    frames = [bytes(f) for f in frames]
    op = rng.choice(["random", "truncate", "cut", "flip", "version", "type", "oversized",
                     "huge_shape", "extra", "empty"])
    if op == "random":
        return [rng.randbytes(rng.randrange(0, 3000)) for _ in range(rng.randrange(1, 5))]
    if op == "truncate" and len(frames) > 1:
        return frames[:rng.randrange(1, len(frames))]
    if op in ("cut", "truncate"):
        i = rng.randrange(len(frames))
        frames[i] = frames[i][:rng.randrange(len(frames[i]) + 1)]
        return frames
    if op == "flip":
        i = rng.randrange(len(frames))
        data = bytearray(frames[i]) or bytearray(b"\0")
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        frames[i] = bytes(data)
        return frames
    if op == "empty":
        return [b""]
    if op == "extra":
        return frames + [rng.randbytes(rng.randrange(100))]
    header = msgpack.unpackb(frames[0])
    if op == "version":
        header["protocol"] = rng.choice([0, 1, 3, 99, "2", None, 2**64 - 1])
    elif op == "type":
        header["type"] = rng.choice(["", "hello ", "rollout_group", "weight_update", "x" * 500])
    elif op == "oversized":
        header["fields"]["padding"] = "p" * (protocol.MAX_HEADER_BYTES + rng.randrange(10**5))
    elif op == "huge_shape" and header["tensors"]:
        name = rng.choice(sorted(header["tensors"]))
        header["tensors"][name]["shape"] = [2**31 - 1, 2**31 - 1, rng.randrange(2**20)]
    else:
        return [rng.randbytes(rng.randrange(1, 200))]
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


def _decodes(frames: list[bytes]) -> object | None:
    """The message the receiver will decode, or None if it is malformed."""
    try:
        return protocol.decode(frames)
    except Exception:
        return None


# Groups for a real grant, each broken in one way the learner must refuse.
def _invalidate(rng: random.Random, group: RolloutGroup, vocab: int, max_new: int) -> RolloutGroup:
    k, t = group.completion_ids.shape
    op = rng.choice(["token", "empty_completion", "too_long", "future", "logprob",
                     "empty_prompt", "prompt", "group_size", "reward"])
    g = dataclasses.replace(group)
    if op == "token":
        g.completion_ids = group.completion_ids.clone()
        g.completion_ids[rng.randrange(k), 0] = vocab + rng.randrange(2**30)
    elif op == "empty_completion":
        row = rng.randrange(k)
        g.completion_ids, g.logprobs = group.completion_ids.clone(), group.logprobs.clone()
        g.completion_lengths = group.completion_lengths.clone()
        g.completion_ids[row], g.logprobs[row], g.completion_lengths[row] = 0, 0.0, 0
    elif op == "too_long":
        n = max_new + rng.randrange(1, 2000)
        g.completion_ids = torch.full((k, n), 5, dtype=torch.int32)
        g.logprobs = torch.full((k, n), -0.5)
        g.completion_lengths = torch.full((k,), n, dtype=torch.int32)
    elif op == "future":
        g.policy_version = rng.choice([10**9, 2**63 - 1])
    elif op == "logprob":
        g.logprobs = group.logprobs.clone()
        g.logprobs[rng.randrange(k), 0] = -rng.uniform(50.01, 1e30)
    elif op == "reward":
        g.rewards = torch.tensor([rng.choice([-1.0, 1.0]) * rng.uniform(1.01e6, 1e38), 0.0])
    elif op == "empty_prompt":
        g.prompt_ids = torch.zeros(0, dtype=torch.int32)
    elif op == "prompt":
        g.prompt_ids = group.prompt_ids.clone()
        i = rng.randrange(len(g.prompt_ids))
        g.prompt_ids[i] = (int(g.prompt_ids[i]) + rng.randrange(1, vocab)) % vocab
    else:
        g.completion_ids = torch.cat([group.completion_ids, group.completion_ids[:1]])
        g.logprobs = torch.cat([group.logprobs, group.logprobs[:1]])
        g.completion_lengths = torch.cat([group.completion_lengths, group.completion_lengths[:1]])
        g.rewards = torch.cat([group.rewards, group.rewards[:1]])
        g.finish_reasons = [*group.finish_reasons, "stop"]
    return g


def _raw_tcp(rng: random.Random, endpoint: str) -> None:
    """Bytes that are not ZeroMQ at all, straight to a bound port."""
    port = int(endpoint.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        try:
            s.sendall(rng.randbytes(rng.randrange(1, 4096)))
        except OSError:
            pass  # the peer may close first


def _records(run_dir: Path) -> list[dict]:
    try:
        return [r for r in read_metrics(run_dir) if r["role"] == "learner" and "loss/policy" in r]
    except FileNotFoundError:
        return []


def _record_after(run_dir: Path, t: float, procs) -> dict:
    """The first learner step record written more than 1 s after time t."""
    return _wait_for(lambda: next((r for r in _records(run_dir) if r["time"] > t + 1.0), None),
                     FUZZ_LIMIT_S, procs)


def _covers(rec: dict, sent: dict) -> bool:
    """Whether a learner step record has counted at least what the fuzzer sent."""
    counted = rec.get("net/bad_control", 0) + rec.get("net/control/rejoin_asked", 0)
    rejected = sum(v for k, v in rec.items() if k.startswith("net/rollouts/rejected_"))
    dropped = sum(v for k, v in rec.items() if k.startswith("net/rollouts/dropped_"))
    return (counted >= sent["control"] and rec.get("net/bad_rollouts", 0) >= sent["rollouts"]
            and rejected >= sent["invalid"] and dropped >= sent["ungranted"])


def _wait_for(predicate, timeout: float, procs=()):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not met in time"
        assert all(p.poll() is None for p in procs), "a process died"
        time.sleep(0.1)
    return value


# ---------------------------------------------------------------- the learner


class Fuzzer:
    """Connections to a learner: drive-by dealers, one actor-like session
    ("fuzzer") with grants, and a PUSH to the rollouts socket."""

    def __init__(self, ctx: zmq.Context, control: str):
        self.ctx, self.control = ctx, control
        self.dealers = [self._dealer() for _ in range(4)]
        self.session = self._dealer()
        self.session.send_multipart(encode(Hello("fuzzer", 1, "none")))
        assert self.session.poll(10_000)
        self.welcome = protocol.decode(self.session.recv_multipart())
        self.push = ctx.socket(zmq.PUSH)
        self.push.linger = 0
        self.push.connect(self.welcome.rollout_endpoint)

    def _dealer(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(self.control)
        return sock

    def drain(self) -> None:
        for sock in self.dealers:
            while sock.poll(0):
                sock.recv_multipart()

    def grant(self) -> WorkGrant | None:
        self.session.send_multipart(encode(WorkRequest("fuzzer", 1)))
        assert self.session.poll(10_000)
        reply = protocol.decode(self.session.recv_multipart())
        if isinstance(reply, protocol.Rejoin):  # the fuzzed Hellos evicted this session
            self.session.send_multipart(encode(Hello("fuzzer", 1, "none")))
            assert self.session.poll(10_000)
            self.welcome = protocol.decode(self.session.recv_multipart())
        return reply if isinstance(reply, WorkGrant) and reply.prompt_indices else None

    def sign(self, group: RolloutGroup) -> RolloutGroup:
        """The session tag a real actor's sockets add (wire.security.rollout_tag)."""
        group.session_tag = rollout_tag(self.welcome.session, group.actor_id, group.prompt_id,
                                        group.grant_id)
        return group

    def close(self) -> None:
        for sock in [*self.dealers, self.session, self.push]:
            sock.close()


def test_fuzzing_every_learner_socket(tmp_path, random_model_dir):
    from transformers import AutoTokenizer

    from rapid_async.actor.rollout import prompt_tokens
    from rapid_async.config import load_config
    from rapid_async.tasks.base import task_from_config
    from rapid_async.tasks.prompts import PromptSettings

    run_dir = tmp_path / "run"
    learner = cli("learner", "--config", str(CONFIG), "--model-dir", str(random_model_dir),
                  "--set", f"run.run_dir={run_dir}", *sum((["--set", o] for o in RUN), []),
                  log=tmp_path / "learner.log")
    procs = [learner]
    ctx = zmq.Context()
    try:
        info = wait_for_file(run_dir / "learner.json", learner)
        procs.append(cli("actor", "--learner", info["control"], "--actor-id", "honest",
                         log=tmp_path / "actor.log"))
        _wait_for(lambda: len(_records(run_dir)) >= 2, 120, procs)
        memory = psutil.Process(learner.pid)
        rss_before = memory.memory_info().rss
        steps_before = len(_records(run_dir))
        tokenizer = AutoTokenizer.from_pretrained(random_model_dir)
        cfg = load_config(CONFIG)
        task = task_from_config(cfg)
        settings = PromptSettings.from_config(cfg, task)
        fuzz = Fuzzer(ctx, info["control"])
        endpoints = [info["control"], fuzz.welcome.rollout_endpoint, fuzz.welcome.weights_endpoint]
        rng = random.Random(9)
        sent = {"control": 0, "control_hellos": 0, "rollouts": 0, "ungranted": 0, "invalid": 0}
        deadline = time.monotonic() + FUZZ_LIMIT_S
        while any(sent[k] < n for k, n in LEARNER_FUZZ.items()):
            assert time.monotonic() < deadline, f"fuzzing not done in {FUZZ_LIMIT_S} s: {sent}"
            what = rng.random()
            if what < 0.45:  # the control socket, from a random connection
                frames = _mutate(rng, rng.choice(_valid_messages(rng))) if rng.random() < 0.8 \
                    else rng.choice(_valid_messages(rng))
                rng.choice(fuzz.dealers).send_multipart(frames)
                msg = _decodes(frames)
                sent["control_hellos" if isinstance(msg, Hello) else "control"] += 1
            elif what < 0.85:  # the rollouts socket
                frames = _mutate(rng, rng.choice(_valid_messages(rng))) if rng.random() < 0.8 \
                    else encode(_group(rng))
                fuzz.push.send_multipart(frames)
                sent["ungranted" if isinstance(_decodes(frames), RolloutGroup) else "rollouts"] += 1
            else:  # a real grant, answered with an invalid group
                grant = fuzz.grant()
                if grant is not None:
                    index = grant.prompt_indices[0]
                    good = _group(rng, prompt_id=str(index), grant_id=grant.grant_id,
                                  prompt_ids=torch.tensor(prompt_tokens(task, tokenizer, index, settings),
                                                          dtype=torch.int32))
                    bad = fuzz.sign(_invalidate(rng, good, len(tokenizer), 4))
                    fuzz.push.send_multipart(encode(bad))
                    sent["invalid"] += 1
            fuzz.drain()
            time.sleep(0.002)
        # The first step record that has counted everything sent (however
        # long the learner takes to read it); over-counting fails below.
        rec = _wait_for(lambda: next((r for r in _records(run_dir) if _covers(r, sent)), None),
                        FUZZ_LIMIT_S, procs)
        # Then bytes that are not ZeroMQ at all, to every port (libzmq drops
        # the connection, or reads them as old-protocol frames: more bad
        # messages), and one message bigger than the learner accepts: the
        # connection is cut before anything is allocated for it.
        for _ in range(60):
            _raw_tcp(rng, rng.choice(endpoints))
        big = ctx.socket(zmq.PUSH)
        big.linger = 0
        big.connect(fuzz.welcome.rollout_endpoint)
        big.send(bytearray(MAX_INBOUND_BYTES + 1), copy=False)
        time.sleep(1.0)
        big.close()
        last = _record_after(run_dir, time.time(), procs)
        rss_after = memory.memory_info().rss
        fuzz.close()
    finally:
        ctx.destroy(linger=0)  # closes every socket still open (term alone would wait for them)
        alive = [p.poll() is None for p in procs]
        for p in procs:
            stop(p)
    log = read_log(tmp_path / "learner.log")
    assert all(alive), log[-3000:]
    assert "Traceback" not in log + read_log(tmp_path / "actor.log")
    assert all(sent[k] >= n for k, n in LEARNER_FUZZ.items()), sent
    # Every malformed or forbidden message was counted where it arrived: as
    # bad, or (a request naming an actor id this learner has no session for)
    # answered with Rejoin.
    counted = rec["net/bad_control"] + rec.get("net/control/rejoin_asked", 0)
    assert sent["control"] <= counted <= sent["control"] + sent["control_hellos"]
    assert rec["net/bad_rollouts"] == sent["rollouts"], (rec, sent)
    rejected = sum(v for k, v in rec.items() if k.startswith("net/rollouts/rejected_"))
    dropped = sum(v for k, v in rec.items() if k.startswith("net/rollouts/dropped_"))
    assert rejected == sent["invalid"] and dropped == sent["ungranted"], (rec, sent)
    # Training went on, and memory stayed flat.
    assert last["step"] > rec["step"] > steps_before
    assert last["net/bad_messages"] >= rec["net/bad_messages"]
    assert rss_after - rss_before < 150 * 2**20, (rss_before, rss_after)


# ---------------------------------------------------------------- the actor


class HostileLearner(threading.Thread):
    """A learner stand-in on real sockets: serves the actor well enough to
    run, and meanwhile sends it garbage on control and on the weights PUB."""

    def __init__(self, model_dir: Path, run_dir: Path):
        super().__init__(daemon=True)
        from transformers import AutoModelForCausalLM

        from rapid_async.config import Config
        from rapid_async.weights import make_delta, make_snapshot

        cfg = Config()
        cfg.algo.group_size, cfg.algo.max_new_tokens, cfg.actor.chunk_groups = 2, 4, 2
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        state = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.snapshot = make_snapshot(state, 0)
        self.delta = make_delta(state, {n: t * 1.01 for n, t in state.items()}, 1, 0)
        self.settings = {"config": cfg.to_dict(), "model_dir": str(model_dir), "run_dir": str(run_dir)}
        self.sockets = LearnerSockets()
        self.rng = random.Random(5)
        self.actor: bytes | None = None
        self.fuzzing = threading.Event()
        self.fuzzed = threading.Event()  # set once ACTOR_FUZZ messages went each way
        self.halt = threading.Event()
        self.sent = {"control": 0, "oversized_grants": 0, "weights": 0}
        self.stats: list[dict] = []
        self.requests: list[str] = []

    def run(self) -> None:
        while not self.halt.is_set():
            got = self.sockets.poll_control(timeout_ms=5)
            if got is not None:
                self._answer(*got)
            while self.sockets.recv_rollout(timeout_ms=0) is not None:
                pass
            if self.fuzzing.is_set() and self.actor is not None:
                self._garbage()
        self.sockets.broadcast(Stop("fuzz over"))
        deadline = time.monotonic() + 5  # the actor's last stats come after the Stop
        while time.monotonic() < deadline and not any(s.get("leaving") for s in self.stats):
            got = self.sockets.poll_control(timeout_ms=20)
            if got is not None:
                self._answer(*got)

    def _answer(self, identity: bytes, msg) -> None:
        self.requests.append(type(msg).__name__)
        if isinstance(msg, Hello):
            self.actor = identity
            self.sockets.reply(identity, self.sockets.welcome(0, self.settings, session="s"))
        elif isinstance(msg, SnapshotRequest):
            self.sockets.reply(identity, self.snapshot)
        elif isinstance(msg, WorkRequest):
            oversized = self.fuzzing.is_set() and self.rng.random() < 0.1
            self.sent["oversized_grants"] += oversized
            self.sockets.reply(identity, WorkGrant(list(range(50)) if oversized else [], 0, 7))
        elif isinstance(msg, ActorStats):
            self.stats.append(dict(msg.stats))

    def _garbage(self) -> None:
        rng = self.rng
        frames = _mutate(rng, rng.choice(_valid_messages(rng)))
        if isinstance(_decodes(frames), (WorkGrant, WeightUpdate, Stop, ErrorReply)):
            return  # a valid reply could answer the actor's pending request
        self.sockets._control.send_multipart([self.actor, *frames])
        self.sent["control"] += 1
        weights = rng.choice([frames, self._bomb(), *(encode(u) for u in self._bad_deltas())])
        self.sockets._weights.send_multipart(weights)
        self.sent["weights"] += 1
        if self.sent["control"] >= ACTOR_FUZZ and self.sent["weights"] >= ACTOR_FUZZ:
            self.fuzzing.clear()
            self.fuzzed.set()
        time.sleep(0.003)

    def _bad_deltas(self) -> list[WeightUpdate]:
        payload = bytearray(self.delta.payload)
        payload[self.rng.randrange(len(payload))] ^= 0x10
        return [dataclasses.replace(self.delta, payload=bytes(payload)),
                dataclasses.replace(self.delta, payload=self.delta.payload[:-7]),
                dataclasses.replace(self.delta, version=9)]

    def _bomb(self) -> list[bytes]:
        """A delta whose streams inflate to 1 GiB; its header lies about the sizes."""
        import zstandard

        from rapid_async.weights import codec

        bomb = zstandard.ZstdCompressor(level=19).compress(bytes(1 << 30)) \
            if not hasattr(self, "_bomb_bytes") else self._bomb_bytes
        self._bomb_bytes = bomb
        layout_hash = codec.read_header(self.snapshot.payload, "snapshot").fields["layout_hash"]
        header = {"kind": "delta", "layout_hash": layout_hash, "count": 1000, "large": 0,
                  "streams": [["gaps", "zstd", 1000, len(bomb)], ["large", "zstd", 0, 0],
                              ["values", "zstd", 4000, len(bomb)]]}
        packed = msgpack.packb(header)
        payload = b"RPW2" + struct.pack("<I", len(packed)) + packed + bomb + bomb
        return encode(WeightUpdate(1, 0, "delta", "sha256:0", "float32", payload, 0))


def test_fuzzing_an_actors_control_and_weights_connections(tmp_path, random_model_dir):
    stub = HostileLearner(random_model_dir, tmp_path)
    stub.start()
    actor = cli("actor", "--learner", stub.sockets.control_endpoint, "--actor-id", "victim",
                log=tmp_path / "actor.log")
    try:
        _wait_for(lambda: "WorkRequest" in stub.requests, 120, [actor])
        stub.fuzzing.set()
        assert stub.fuzzed.wait(timeout=FUZZ_LIMIT_S), f"fuzzing not done: {stub.sent}"
        assert actor.poll() is None, read_log(tmp_path / "actor.log")[-3000:]
        time.sleep(1.0)
        memory = psutil.Process(actor.pid).memory_info().rss
        stub.halt.set()  # sends Stop
        assert actor.wait(timeout=60) == 0, read_log(tmp_path / "actor.log")[-3000:]
    finally:
        stub.halt.set()
        stub.join(timeout=10)
        stub.sockets.close()
        stop(actor)
    log = read_log(tmp_path / "actor.log")
    assert "stopped: fuzz over" in log and "Traceback" not in log
    final = [s for s in stub.stats if "actor/bad_control" in s][-1]
    assert stub.sent["control"] >= ACTOR_FUZZ and stub.sent["weights"] >= ACTOR_FUZZ, stub.sent
    # Each garbage control message and each cut grant was counted by the actor.
    assert final["actor/bad_control"] == stub.sent["control"] + stub.sent["oversized_grants"]
    assert final["actor/rejected_updates"] >= 1
    assert final["version"] == 0  # it holds the verified snapshot, nothing forged
    assert memory < 2 * 2**30  # a decompressed bomb alone would be 1 GiB more
