"""Tests for rapid_async.wire.security: the loopback rule and CURVE keys."""

from __future__ import annotations

import pytest
import zmq

from rapid_async.wire.security import check_secure, is_loopback, new_curve_keys


@pytest.mark.parametrize(
    "where, expected",
    [("127.0.0.1", True), ("tcp://127.0.0.1:5555", True), ("tcp://[::1]:5", True), ("localhost", True),
     ("ipc:///tmp/x", True), ("0.0.0.0", False), ("*", False), ("tcp://10.0.0.2:5", False), ("gpu-node-3", False)],
)
def test_is_loopback(where, expected):
    assert is_loopback(where) is expected


def test_check_secure_allows_loopback_curve_or_explicit_opt_out():
    check_secure("tcp://127.0.0.1:5", curve=False, allow_insecure=False)
    check_secure("0.0.0.0", curve=True, allow_insecure=False)
    check_secure("0.0.0.0", curve=False, allow_insecure=True)
    with pytest.raises(ValueError, match="0.0.0.0 is not a loopback address"):
        check_secure("0.0.0.0", curve=False, allow_insecure=False)


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_new_curve_keys_are_distinct_z85_pairs():
    a, b = new_curve_keys(), new_curve_keys()
    assert len(a.public) == len(a.secret) == 40 and a.public != b.public
    assert zmq.curve_public(a.secret) == a.public


# ---------------------------------------------------------------- key files and CURVE from config

import stat  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from rapid_async.config import load_config  # noqa: E402
from rapid_async.wire.security import (learner_curve, load_authorized_keys,  # noqa: E402
                                       load_public_key, load_secret_key, write_key_pair)

needs_curve = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")


@needs_curve
def test_write_key_pair_makes_a_private_secret_file_and_never_overwrites(tmp_path):
    public, secret = write_key_pair(tmp_path / "keys", "learner")
    assert public.name == "learner.key" and secret.name == "learner.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    keys = load_secret_key(secret)
    assert load_public_key(public) == keys.public == zmq.curve_public(keys.secret)
    assert load_authorized_keys(public) == [keys.public]
    with pytest.raises(ValueError, match="exists"):
        write_key_pair(tmp_path / "keys", "learner")
    write_key_pair(tmp_path / "keys", "actor-2")
    assert len(load_authorized_keys(tmp_path / "keys")) == 2, "a directory: every *.key"


@needs_curve
def test_bad_key_files_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="transport.curve_secret_key = .*no such file"):
        load_secret_key(tmp_path / "missing.key_secret")
    public, _ = write_key_pair(tmp_path, "a")
    with pytest.raises(ValueError, match="transport.curve_secret_key = .*not a CURVE key file"):
        load_secret_key(public)  # a public key where the secret one belongs
    (tmp_path / "junk.key").write_text("public-key = \"short\"\n")
    with pytest.raises(ValueError, match="transport.authorized_keys = .*not a CURVE key file"):
        load_authorized_keys(tmp_path / "junk.key")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no \\*.key file"):
        load_authorized_keys(tmp_path / "empty")


def _curve_config(tmp_path, host="127.0.0.1"):
    learner_pub, learner_secret = write_key_pair(tmp_path / "learner", "learner")
    actor_pub, actor_secret = write_key_pair(tmp_path / "actors", "actor-0")
    cfg = load_config(overrides=[
        f"transport.host={host}", f"transport.curve_secret_key={learner_secret}",
        f"transport.curve_public_key={learner_pub}",
        f"transport.authorized_keys={tmp_path / 'actors'}"])
    return cfg, load_secret_key(actor_secret), load_public_key(learner_pub)


@needs_curve
def test_config_allows_other_hosts_only_with_curve(tmp_path):
    with pytest.raises(ValueError, match="transport.host = '0.0.0.0' is not loopback: set "
                                         "transport.curve_secret_key"):
        load_config(overrides=["transport.host=0.0.0.0"])
    with pytest.raises(ValueError, match="also set transport.curve_public_key"):
        load_config(overrides=["transport.curve_secret_key=/x.key_secret"])
    with pytest.raises(ValueError, match="need transport.curve_secret_key"):
        load_config(overrides=["transport.authorized_keys=/keys"])
    cfg, _, _ = _curve_config(tmp_path, host="0.0.0.0")
    keys, allowed = learner_curve(cfg.transport)
    assert len(allowed) == 1 and keys.public == load_public_key(cfg.transport.curve_public_key)
    wrong, _ = write_key_pair(tmp_path, "other")
    cfg.transport.curve_public_key = str(wrong)
    with pytest.raises(ValueError, match="is not the public key of transport.curve_secret_key"):
        learner_curve(cfg.transport)


def _group(actor_id: str):
    from rapid_async.wire.protocol import RolloutGroup

    return RolloutGroup(actor_id=actor_id, prompt_id="0", policy_version=0,
                        prompt_ids=torch.tensor([1, 2], dtype=torch.int32),
                        completion_ids=torch.ones(2, 2, dtype=torch.int32),
                        completion_lengths=torch.tensor([2, 2], dtype=torch.int32),
                        logprobs=torch.full((2, 2), -0.5), rewards=torch.tensor([1.0, 0.0]),
                        gen_seconds=0.1, created_at=time.time(), info={},
                        finish_reasons=["stop", "stop"])


def _intruder_sockets(ctx, learner, keys=None, server_key=None):
    """A DEALER, PUSH and SUB aimed at the learner's three endpoints."""
    socks = []
    for kind, endpoint in ((zmq.DEALER, learner.control_endpoint),
                           (zmq.PUSH, learner.rollout_endpoint),
                           (zmq.SUB, learner.weights_endpoint)):
        sock = ctx.socket(kind)
        sock.linger = 0
        if keys is not None:
            sock.curve_publickey, sock.curve_secretkey = keys
            sock.curve_serverkey = server_key
        if kind == zmq.SUB:
            sock.subscribe(b"")
        sock.connect(endpoint)
        socks.append(sock)
    return socks


@needs_curve
def test_curve_from_config_lets_in_only_authorized_actors(tmp_path):
    """Real sockets on loopback with CURVE from the config: the authorized actor
    trades messages; an actor with another key, or with none, receives nothing
    (no Welcome, no weights) and nothing it sends reaches the learner."""
    from rapid_async.wire.protocol import Hello, WorkRequest, encode
    from rapid_async.wire.transport import ActorSockets, LearnerSockets
    from rapid_async.weights import make_snapshot

    cfg, actor_keys, server_key = _curve_config(tmp_path)
    keys, allowed = learner_curve(cfg.transport)
    learner = LearnerSockets(curve_keys=keys, allowed_client_keys=allowed)
    ctx = zmq.Context()
    actor = ActorSockets(learner.control_endpoint, "trusted", curve_keys=actor_keys,
                         server_key=server_key)
    stranger = zmq.curve_keypair()
    intruders = [_intruder_sockets(ctx, learner, stranger, server_key),  # wrong key
                 _intruder_sockets(ctx, learner)]                        # no CURVE at all
    try:
        for dealer, push, _ in intruders:
            dealer.send_multipart(encode(Hello("intruder", 1, "hf")))
            dealer.send_multipart(encode(WorkRequest("intruder", 4)))
            push.sndtimeo = 500
            try:
                push.send_multipart(encode(_group("intruder")))
            except zmq.Again:
                pass  # no connection to queue it on: the handshake was refused
        actor._send_control(Hello("trusted", 2, "hf"))
        got = learner.poll_control(timeout_ms=5000)
        assert got is not None and got[1] == Hello("trusted", 2, "hf")
        learner.reply(got[0], learner.welcome(0, {}))
        # The trusted actor's Hello is the only control message that arrived.
        assert learner.poll_control(timeout_ms=1000) is None
        actor._await_reply(type(learner.welcome(0, {})), 5000, "hello")
        actor._rollouts = actor._connect(zmq.PUSH, learner.rollout_endpoint)
        actor._weights = actor._connect(zmq.SUB, learner.weights_endpoint)
        actor._weights.subscribe(b"")
        assert actor.send_rollout(_group("trusted"), timeout_ms=2000)
        received = learner.recv_rollout(timeout_ms=3000)
        assert received is not None and received.actor_id == "trusted"
        assert learner.recv_rollout(timeout_ms=1000) is None, "no intruder group arrived"
        update = make_snapshot({"w": torch.ones(3)}, version=1)
        deadline = time.monotonic() + 5
        while (got := actor.recv_weights(timeout_ms=100)) is None:
            assert time.monotonic() < deadline, "the trusted actor gets the weights"
            learner.publish(update)
        assert got.version == 1
        for dealer, _, sub in intruders:
            assert not dealer.poll(500), "no reply to an intruder"
            assert not sub.poll(0), "no weights to an intruder"
        assert learner.poll_control(timeout_ms=500) is None
        assert learner.recv_rollout(timeout_ms=0) is None
    finally:
        for socks in intruders:
            for sock in socks:
                sock.close(linger=0)
        ctx.term()
        actor.close()
        learner.close()
