"""Tests for rapid_async.weights.publisher: off-loop encoding, superseding, chains, snapshots."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rapid_async.tinymodel import build_model
from rapid_async.weights import apply_update, codec
from rapid_async.weights.publisher import WeightPublisher

pytestmark = pytest.mark.usefixtures("one_thread")


class Collector:
    """on_update / on_snapshot callbacks that record what was published."""

    def __init__(self):
        self.updates, self.stats, self.snapshots = [], [], []
        self.gate = threading.Event()
        self.gate.set()

    def on_update(self, update, stats):
        self.gate.wait(30)
        self.updates.append(update)
        self.stats.append(stats)

    def on_snapshot(self, update):
        self.snapshots.append(update)


def cast(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to(torch.bfloat16).clone() for n, p in model.named_parameters()}


def nudge(model, seed: int) -> None:
    """An in-place change of the weights, like an optimizer step."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))


@pytest.fixture
def setup():
    model = build_model(seed=0)
    got = Collector()
    publisher = WeightPublisher(model, "bfloat16", got.on_update, got.on_snapshot)
    publisher.begin(0)
    yield model, publisher, got
    publisher.close()


def test_published_deltas_chain_to_the_models_cast_weights(setup):
    model, publisher, got = setup
    state = cast(model)
    assert "lm_head.weight" not in state  # tied: sent once
    publisher.request_snapshot()
    expected = {}
    for version in (1, 2, 3):
        nudge(model, version)
        expected[version] = cast(model)
        publisher.stage(version)
        assert publisher.wait_published(version, timeout=30)
    assert [(u.base_version, u.version) for u in got.updates] == [(0, 1), (1, 2), (2, 3)]
    state = apply_update(None, None, got.snapshots[0])
    assert got.snapshots[0].version == 0
    for update in got.updates:
        state = apply_update(state, update.base_version, update)
        assert all(torch.equal(state[n].view(torch.int16), expected[update.version][n].view(torch.int16))
                   for n in state)
    stats = got.stats[-1]
    assert stats["weights/version"] == 3 and stats["weights/update_bytes"] == len(got.updates[-1].payload)
    assert 0 < stats["weights/changed"] <= stats["weights/elements"]
    assert 0 < stats["weights/entropy_bound_bytes"] < stats["weights/snapshot_bytes"]


def test_a_newer_version_supersedes_one_not_yet_encoded(setup):
    model, publisher, got = setup
    got.gate.clear()  # the thread blocks handing out version 1
    nudge(model, 1)
    publisher.stage(1)
    deadline = time.monotonic() + 10
    while publisher._pending is not None and time.monotonic() < deadline:
        time.sleep(0.01)  # the thread took version 1
    for version in (2, 3):
        nudge(model, version)
        publisher.stage(version)
    final = cast(model)
    got.gate.set()
    assert publisher.wait_published(3, timeout=30)
    assert [(u.base_version, u.version) for u in got.updates] == [(0, 1), (1, 3)]
    assert publisher.superseded == 1 and got.stats[-1]["weights/superseded"] == 1
    state = apply_update(None, None, publisher_snapshot(publisher, got))
    assert state["model.embed_tokens.weight"].view(torch.int16).equal(
        final["model.embed_tokens.weight"].view(torch.int16))


def publisher_snapshot(publisher, got):
    had = len(got.snapshots)
    publisher.request_snapshot()
    deadline = time.monotonic() + 30
    while len(got.snapshots) == had and time.monotonic() < deadline:
        time.sleep(0.01)
    return got.snapshots[-1]


def test_staging_never_waits_for_an_encode(setup, monkeypatch):
    model, publisher, got = setup
    slow = codec.pack_delta

    def pack_slowly(*args):
        time.sleep(1.0)
        return slow(*args)

    monkeypatch.setattr(codec, "pack_delta", pack_slowly)
    took = []
    for version in (1, 2, 3):
        nudge(model, version)
        took.append(publisher.stage(version))
    assert max(took) < 0.3, took  # only the cast into a buffer
    assert publisher.wait_published(3, timeout=30)
    assert got.updates[-1].version == 3 and got.updates[-1].base_version in (1, 2)


def test_the_published_copy_is_taken_when_staged(setup):
    model, publisher, got = setup
    nudge(model, 1)
    at_stage = cast(model)
    publisher.stage(1)
    nudge(model, 2)  # the next optimizer step, before the thread encodes
    assert publisher.wait_published(1, timeout=30)
    state = apply_update(None, None, publisher_snapshot(publisher, got))
    assert all(torch.equal(state[n].view(torch.int16), at_stage[n].view(torch.int16)) for n in state)


def test_snapshots_are_built_once_per_version(setup):
    model, publisher, got = setup
    first = publisher_snapshot(publisher, got)
    assert publisher_snapshot(publisher, got) is first
    nudge(model, 1)
    publisher.stage(1)
    publisher.wait_published(1, timeout=30)
    second = publisher_snapshot(publisher, got)
    assert second.version == 1 and second is not first


def test_a_failure_in_the_thread_reaches_the_training_loop(setup, monkeypatch):
    model, publisher, got = setup
    monkeypatch.setattr(codec, "extract_delta", lambda *a: 1 / 0)
    publisher.stage(1)
    with pytest.raises(RuntimeError, match="weight publisher failed: ZeroDivisionError"):
        publisher.wait_published(1, timeout=30)
    with pytest.raises(RuntimeError, match="weight publisher failed"):
        publisher.stage(2)


def test_a_snapshot_request_is_not_starved_by_a_stream_of_versions(setup, monkeypatch):
    model, publisher, got = setup
    slow = codec.pack_delta
    monkeypatch.setattr(codec, "pack_delta", lambda *a: time.sleep(0.2) or slow(*a))
    publisher.stage(1)
    publisher.request_snapshot()
    for version in range(2, 12):  # a new version is always pending
        nudge(model, version)
        publisher.stage(version)
        time.sleep(0.1)
        if got.snapshots:
            break
    assert got.snapshots and got.snapshots[0].version < 11
    assert publisher.wait_published(version, timeout=30)
