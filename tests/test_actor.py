"""Tests for rapid_async.actor.loop's weight intake: a real Actor (hf engine) on real sockets.

A small learner stand-in (real LearnerSockets in a thread) answers Hello,
SnapshotRequest and DeltaRequest and publishes deltas on PUB. The actor must
end every poll holding verified weights: deltas it missed come from the
learner's chain, anything it cannot verify makes it take a snapshot, and
garbage on the weights socket is counted and survived.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from rapid_async.actor.loop import Actor
from rapid_async.config import Config
from rapid_async.weights import digest_named, make_delta, make_snapshot
from rapid_async.wire.protocol import DeltaRequest, ErrorReply, Hello, SnapshotRequest, encode
from rapid_async.wire.transport import LearnerSockets

pytestmark = pytest.mark.usefixtures("one_thread")


class LearnerStub:
    """Serves versions 0..N of a weight sequence: snapshots, a delta chain, PUB."""

    def __init__(self, model_dir, tmp_path, states: list[dict]):
        self.sockets = LearnerSockets()
        self.states, self.version = states, 0
        self.chain: dict[int, object] = {}  # base version -> delta
        self.requests: list = []
        self.settings = {"config": Config().to_dict(), "model_dir": str(model_dir),
                         "run_dir": str(tmp_path)}
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._halt.is_set():
            got = self.sockets.poll_control(timeout_ms=20)
            if got is None:
                continue
            identity, msg = got
            self.requests.append(msg)
            if isinstance(msg, Hello):
                self.sockets.reply(identity, self.sockets.welcome(self.version, self.settings))
            elif isinstance(msg, SnapshotRequest):
                self.sockets.reply(identity, make_snapshot(self.states[self.version], self.version))
            elif isinstance(msg, DeltaRequest):
                delta = self.chain.get(msg.base_version)
                self.sockets.reply(identity, delta or ErrorReply("not kept; ask for a snapshot"))

    def advance(self, publish: bool = True, keep: bool = True):
        """Make the next version current; publish its delta on PUB and/or keep it in the chain."""
        base = self.version
        self.version += 1
        delta = make_delta(self.states[base], self.states[self.version], self.version, base)
        if keep:
            self.chain[base] = delta
        if publish:
            self.sockets.publish(delta)
        return delta

    def close(self) -> None:
        self._halt.set()
        self._thread.join(5)
        self.sockets.close()


def weight_sequence(model_dir, n: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    states, gen = [], torch.Generator().manual_seed(0)
    for _ in range(n + 1):
        states.append({name: p.detach().clone() for name, p in model.named_parameters()})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=gen))
    return states


@pytest.fixture
def stub_and_actor(random_model_dir, tmp_path):
    stub = LearnerStub(random_model_dir, tmp_path, weight_sequence(random_model_dir, 8))
    actor = Actor(stub.sockets.control_endpoint, actor_id="a0", engine="hf", hello_timeout_s=10)
    actor.setup()
    yield stub, actor
    actor.close()
    stub.close()


def holds(actor, state: dict, version: int) -> bool:
    return (actor.version == version and actor.receiver.buffer_digest() == digest_named(state, "float32")
            and actor.receiver.state_digest == actor.receiver.buffer_digest())


def poll_until(actor, version: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while actor.version != version and time.monotonic() < deadline:
        actor.poll_weights(timeout_ms=50)


def wait_subscribed(stub, actor, timeout: float = 60.0) -> int:
    """Probe the PUB with a non-message until the actor has seen one (the SUB is
    connected and subscribed: ZeroMQ's slow joiner); returns the rejected count."""
    before = actor.stats["rejected_updates"]
    deadline = time.monotonic() + timeout
    while actor.stats["rejected_updates"] == before and time.monotonic() < deadline:
        stub.sockets._weights.send_multipart([b"\x00probe"])
        actor.poll_weights(timeout_ms=50)
    assert actor.stats["rejected_updates"] > before, "the actor never received from the PUB"
    for _ in range(5):  # drain probes still in flight
        actor.poll_weights(timeout_ms=20)
    return actor.stats["rejected_updates"]


def test_missed_deltas_come_from_the_chain_not_a_snapshot(stub_and_actor):
    stub, actor = stub_and_actor
    assert holds(actor, stub.states[0], 0) and actor.stats["snapshots"] == 1
    wait_subscribed(stub, actor)
    stub.advance()                 # 1: published
    stub.advance(publish=False)    # 2: dropped by a full queue
    stub.advance(publish=False)    # 3: dropped
    stub.advance()                 # 4: published
    poll_until(actor, 4)
    assert holds(actor, stub.states[4], 4)
    assert actor.stats["chain_fetches"] == 2 and actor.stats["deltas"] == 4
    assert actor.stats["snapshots"] == 1
    assert sum(isinstance(m, DeltaRequest) for m in stub.requests) == 2


def test_a_gap_the_chain_no_longer_covers_falls_back_to_a_snapshot(stub_and_actor):
    stub, actor = stub_and_actor
    wait_subscribed(stub, actor)
    stub.advance(publish=False, keep=False)  # 1: lost everywhere
    stub.advance()                           # 2
    poll_until(actor, 2)
    assert holds(actor, stub.states[2], 2) and actor.stats["snapshots"] == 2


def test_garbage_and_corrupt_updates_on_the_weights_socket_are_survived(stub_and_actor):
    stub, actor = stub_and_actor
    base = wait_subscribed(stub, actor)
    pub = stub.sockets._weights
    pub.send_multipart([b"\x00garbage"])  # not a message at all
    pub.send_multipart([b"\x93\x01\x02\x03", b"x" * 1000])
    delta = stub.advance(publish=False)
    flipped = bytearray(delta.payload)
    flipped[len(flipped) // 2] ^= 0x40
    pub.send_multipart(encode(dataclasses.replace(delta, payload=bytes(flipped))))
    pub.send_multipart(encode(dataclasses.replace(delta, payload=delta.payload[:-10])))
    pub.send_multipart(encode(dataclasses.replace(delta, version=7)))  # altered header
    deadline = time.monotonic() + 60
    while actor.stats["rejected_updates"] < base + 3 and time.monotonic() < deadline:
        actor.poll_weights(timeout_ms=50)
    assert actor.stats["rejected_updates"] >= base + 3
    assert holds(actor, stub.states[1], 1)  # resynchronised by a snapshot, verified
    assert actor.stats["snapshots"] >= 2
