"""An actor's ZeroMQ sockets: connected to the learner (`ActorSockets`,
`HeartbeatSocket`).

Used by actor processes (`rapid_async.actor.loop`, its heartbeat thread, and
test or benchmark clients); `rapid_async.wire.transport` describes the sockets
and re-exports this module's names. Request/reply helpers (`hello`,
`request_snapshot`, ...) raise: TimeoutError when the learner does not answer,
RuntimeError on an ErrorReply, `LearnerRestarted` on a Rejoin.
"""

from __future__ import annotations

import re
import time
from collections import deque

import zmq

from rapid_async.wire.protocol import (
    ActorStats,
    DeltaRequest,
    ErrorReply,
    EvalResult,
    Heartbeat,
    Hello,
    Message,
    Rejoin,
    RolloutGroup,
    SnapshotRequest,
    WeightUpdate,
    Welcome,
    WorkGrant,
    WorkRequest,
    encode,
)
from rapid_async.wire.receive import BadMessage, expect, recv_decoded
from rapid_async.wire.security import CurveKeys, check_secure, require_curve, rollout_tag


class HelloRefused(RuntimeError):
    """The learner answered Hello with an ErrorReply (e.g. it serves
    learner.max_actors actors that all deliver): retry later, with backoff."""


class LearnerRestarted(RuntimeError):
    """The learner answered a request with Rejoin: it does not know this actor
    (it restarted from a checkpoint). Say Hello again and take a snapshot."""


def _reachable(endpoint: str, control_endpoint: str) -> str:
    """A learner bound to a wildcard (0.0.0.0, ::, *) advertises it; connect to
    the host we reached its control socket on instead."""
    match = re.fullmatch(r"tcp://(.*):(\d+)", endpoint)
    if not match or match.group(1).strip("[]") not in ("0.0.0.0", "::", "*"):
        return endpoint
    host = re.fullmatch(r"tcp://(.*):\d+", control_endpoint)
    return f"tcp://{host.group(1)}:{match.group(2)}" if host else endpoint


class ActorSockets:
    """An actor's sockets: DEALER to control now, PUSH and SUB after `hello`.

    Args:
        control_endpoint: the learner's control endpoint, e.g. "tcp://127.0.0.1:5555".
        actor_id: this actor's name, sent in every request.
        rollout_hwm: PUSH send high-water mark in messages; when full, sends block.
        weights_hwm: SUB receive high-water mark in messages; when full, updates drop.
        curve_keys: this actor's CURVE keypair; server_key: the learner's public key.
        allow_insecure: allow a non-loopback learner without CURVE.
    """

    def __init__(
        self,
        control_endpoint: str,
        actor_id: str,
        rollout_hwm: int = 8,
        weights_hwm: int = 2,
        curve_keys: CurveKeys | None = None,
        server_key: bytes | None = None,
        allow_insecure: bool = False,
    ):
        if (curve_keys is None) != (server_key is None):
            raise ValueError("CURVE needs both curve_keys (the actor's) and server_key (the learner's public key)")
        check_secure(control_endpoint, curve_keys is not None, allow_insecure)
        if curve_keys is not None:
            require_curve()
        self.control_endpoint = control_endpoint
        self.actor_id = actor_id
        self._curve = (curve_keys, server_key)
        self._hwms = (rollout_hwm, weights_hwm)
        self._pending: deque = deque()  # control messages received while waiting for a reply
        self.session = ""  # the session secret of the last Welcome (signs rollout groups)
        self._ctx = zmq.Context()
        self._rollouts = self._weights = None
        # control: DEALER, connects to the learner's ROUTER. Requests and the
        # learner's replies and Stop share it; default HWMs.
        self._control = self._connect(zmq.DEALER, control_endpoint)

    def _connect(self, kind: int, endpoint: str, sndhwm: int = 1000, rcvhwm: int = 1000) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        sock.linger = 0
        sock.sndhwm, sock.rcvhwm = sndhwm, rcvhwm
        keys, server_key = self._curve
        if keys is not None:
            sock.curve_publickey, sock.curve_secretkey = keys
            sock.curve_serverkey = server_key
        if "[" in endpoint:
            sock.ipv6 = True  # tcp://[::1]:PORT
        sock.connect(endpoint)
        return sock

    def _send_control(self, msg: Message) -> None:
        if not self._control.poll(1000, zmq.POLLOUT):
            raise TimeoutError(f"control queue to {self.control_endpoint} is full; is rapid-learner running?")
        self._control.send_multipart(encode(msg), copy=False)

    def _await_reply(self, cls: type, timeout_ms: int, what: str) -> Message:
        """Waits for a control message of type cls; keeps the others for recv_control."""
        deadline = time.monotonic() + timeout_ms / 1000
        while (left_ms := int((deadline - time.monotonic()) * 1000)) >= 0:
            got = recv_decoded(self._control, "control", left_ms)
            if got is None:
                break
            msg = got[1]
            if isinstance(msg, cls):
                return msg
            if isinstance(msg, ErrorReply):
                if what == "hello":
                    raise HelloRefused(f"learner at {self.control_endpoint} refused the hello: "
                                       f"{msg.message}")
                raise RuntimeError(f"learner at {self.control_endpoint} refused the {what}: {msg.message}")
            if isinstance(msg, Rejoin):
                raise LearnerRestarted(f"learner at {self.control_endpoint} asks to rejoin: {msg.reason}")
            self._pending.append(msg)
        if what == "hello":
            raise TimeoutError(
                f"no learner at {self.control_endpoint}; is rapid-learner running? (no answer in {timeout_ms} ms)"
            )
        raise TimeoutError(f"learner at {self.control_endpoint} did not answer the {what} in {timeout_ms} ms")

    def hello(self, pid: int, engine: str, timeout_ms: int = 10_000,
              session: str = "") -> Welcome:
        """Introduces this actor and connects the rollouts and weights sockets.
        `session`: the secret of a session this actor already holds (when it
        reconnects to the same learner), else empty.

        Raises:
            TimeoutError: "no learner at <endpoint>; is rapid-learner running?".
            HelloRefused (a RuntimeError): if the learner answers with an ErrorReply.
        """
        self._send_control(Hello(self.actor_id, pid, engine, session))
        welcome = self._await_reply(Welcome, timeout_ms, "hello")
        self.session = welcome.session
        welcome.rollout_endpoint = _reachable(welcome.rollout_endpoint, self.control_endpoint)
        welcome.weights_endpoint = _reachable(welcome.weights_endpoint, self.control_endpoint)
        if self._rollouts is None:
            rollout_hwm, weights_hwm = self._hwms
            # rollouts: PUSH, connects to the learner's PULL. SNDHWM messages
            # queue here; when full, send_rollout BLOCKS up to its timeout
            # (backpressure: the actor pauses instead of piling up stale work).
            self._rollouts = self._connect(zmq.PUSH, welcome.rollout_endpoint, sndhwm=rollout_hwm)
            # weights: SUB (all topics), connects to the learner's PUB. RCVHWM
            # messages; beyond that updates are DROPPED and the version gap
            # shows on the next delta. Updates published before the subscription
            # reaches the learner are missed: start from a snapshot.
            self._weights = self._connect(zmq.SUB, welcome.weights_endpoint, rcvhwm=weights_hwm)
            self._weights.subscribe(b"")
        return welcome

    def _require_hello(self) -> None:
        if self._rollouts is None:
            raise RuntimeError("call hello() first: the rollouts and weights endpoints come with the Welcome")

    def send_rollout(self, group: RolloutGroup, timeout_ms: int = 1000) -> bool:
        """Queues a rollout group for the learner, waiting up to timeout_ms for room.

        The group is signed with this connection's session (`session_tag`)
        unless it carries a tag already.

        Returns:
            True if queued; False if the queue stayed full (the learner is behind):
            keep the group, service weights / control, and try again.
        """
        self._require_hello()
        if not group.session_tag and self.session:
            group.session_tag = rollout_tag(self.session, group.actor_id, group.prompt_id,
                                            group.grant_id)
        frames = encode(group)
        if not self._rollouts.poll(timeout_ms, zmq.POLLOUT):
            return False
        try:
            self._rollouts.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        return True

    def recv_weights(self, timeout_ms: int = 0) -> WeightUpdate | BadMessage | None:
        """Next published weight update, a BadMessage, or None after timeout_ms."""
        self._require_hello()
        got = recv_decoded(self._weights, "weights", timeout_ms)
        return None if got is None else expect(got[1], WeightUpdate, "weights")

    def request_snapshot(self, reason: str, timeout_ms: int = 60_000) -> WeightUpdate:
        """Asks the learner for the full weights and waits for them (on the control socket).

        Raises:
            TimeoutError: if no snapshot arrives within timeout_ms.
            RuntimeError: if the learner answers with an ErrorReply.
        """
        self._send_control(SnapshotRequest(self.actor_id, reason))
        return self._await_reply(WeightUpdate, timeout_ms, "snapshot request")

    def request_delta(self, base_version: int, timeout_ms: int = 60_000) -> WeightUpdate:
        """Asks the learner for its kept delta from base_version (to catch up missed ones).

        Raises:
            TimeoutError: if no reply arrives within timeout_ms.
            RuntimeError: if the learner no longer keeps it (an ErrorReply).
        """
        self._send_control(DeltaRequest(self.actor_id, base_version))
        return self._await_reply(WeightUpdate, timeout_ms, "delta request")

    def request_work(self, max_groups: int, timeout_ms: int = 60_000) -> WorkGrant:
        """Asks the learner for up to max_groups prompts and waits for the grant.

        Raises:
            TimeoutError: if no grant arrives within timeout_ms.
            RuntimeError: if the learner answers with an ErrorReply.
        """
        self._send_control(WorkRequest(self.actor_id, max_groups))
        return self._await_reply(WorkGrant, timeout_ms, "work request")

    def send_stats(self, stats: dict) -> bool:
        """Sends a flat dict of str -> float / int / str / bool; False if dropped (queue full)."""
        try:
            self._control.send_multipart(encode(ActorStats(self.actor_id, stats)), flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def send_eval_result(self, result: EvalResult) -> None:
        """Sends the answer to an EvalTask (waits up to 1 s for room on the control queue).

        Raises:
            TimeoutError: if the control queue stays full.
        """
        self._send_control(result)

    def open_heartbeat(self) -> "HeartbeatSocket":
        """A second control connection for the actor's heartbeat thread.

        ZeroMQ sockets are single-thread, and the main thread may be busy in the
        engine for minutes, so heartbeats travel on a DEALER of their own, in a
        context of their own (closing it never waits on this object's sockets,
        nor the other way round). Create it in the thread that uses it.
        """
        keys, server_key = self._curve
        return HeartbeatSocket(self.control_endpoint, self.actor_id, keys, server_key)

    def recv_control(self, timeout_ms: int = 0) -> Message | BadMessage | None:
        """Next unsolicited control message (e.g. Stop), a BadMessage, or None after timeout_ms."""
        if self._pending:
            return self._pending.popleft()
        got = recv_decoded(self._control, "control", timeout_ms)
        return None if got is None else got[1]

    def poll(self, timeout_ms: int) -> set[str]:
        """Waits until weights or control has a message; returns the ready names."""
        if self._pending:
            return {"control"}
        poller = zmq.Poller()
        poller.register(self._control, zmq.POLLIN)
        if self._weights is not None:
            poller.register(self._weights, zmq.POLLIN)
        ready = dict(poller.poll(timeout_ms))
        return {name for name, sock in (("weights", self._weights), ("control", self._control)) if sock in ready}

    def close(self) -> None:
        """Closes the sockets at once (linger 0: queued rollouts are dropped) and the context."""
        for sock in (self._rollouts, self._weights, self._control):
            if sock is not None:
                sock.close(linger=0)
        self._ctx.term()


class HeartbeatSocket:
    """An actor's heartbeat connection: a DEALER to the learner's control socket.

    Sends `Heartbeat` messages and never waits: if the queue to the learner is
    full (learner gone) a beat is dropped. The learner does not answer beats;
    anything it sends here (e.g. a Stop broadcast) is read and discarded, since
    the main control connection receives the same.
    """

    def __init__(self, endpoint: str, actor_id: str, curve_keys: CurveKeys | None = None,
                 server_key: bytes | None = None):
        self.actor_id = actor_id
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        self._sock.sndhwm = 4
        if curve_keys is not None:
            self._sock.curve_publickey, self._sock.curve_secretkey = curve_keys
            self._sock.curve_serverkey = server_key
        if "[" in endpoint:
            self._sock.ipv6 = True
        self._sock.connect(endpoint)

    def beat(self, session: str) -> bool:
        """Sends one heartbeat; False if it was dropped (queue full)."""
        while self._sock.poll(0, zmq.POLLIN):
            self._sock.recv_multipart()
        try:
            self._sock.send_multipart(encode(Heartbeat(self.actor_id, session)), flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()
