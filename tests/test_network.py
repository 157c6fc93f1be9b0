"""Tests for rapid_async.learner.network's weight serving: snapshots built by the
publisher (never on the network thread) and the chain of recent deltas.
Real sockets on loopback, a real publisher thread on the tiny model."""

from __future__ import annotations

import os
import time

import pytest
import torch

from rapid_async.config import load_config
from rapid_async.learner.buffer import RolloutBuffer
from rapid_async.learner.network import LearnerNetwork
from rapid_async.learner.scheduler import WorkScheduler
from rapid_async.tinymodel import build_model
from rapid_async.weights import apply_update
from rapid_async.weights.publisher import WeightPublisher
from rapid_async.wire.transport import ActorSockets

pytestmark = pytest.mark.usefixtures("one_thread")


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
