"""ZeroMQ sockets between the learner process and the actor processes.

The learner process owns a `LearnerSockets` and BINDS; each actor process owns
an `ActorSockets` and CONNECTS, so actors can come and go. Three sockets:

    rollouts  actor PUSH  -> learner PULL    RolloutGroup
    weights   learner PUB -> actor SUB       WeightUpdate (deltas, snapshots)
    control   actor DEALER <-> learner ROUTER Hello/Welcome, SnapshotRequest/
                                              WeightUpdate, DeltaRequest/WeightUpdate,
                                              WorkRequest/(EvalTask) WorkGrant,
                                              EvalResult, ActorStats, Stop, ErrorReply

Start-up order: the learner binds all three; an actor connects its DEALER to
the control endpoint (the only address it is given), sends Hello, and the
Welcome reply tells it the rollouts and weights endpoints, which it then
connects. An actor started before the learner waits in `hello` up to its
timeout (ZeroMQ reconnects by itself), then fails with a clear message.

Received messages are never trusted: a receive method consumes the whole
multipart message and returns a `BadMessage` (reason, socket) instead of
raising when it cannot be decoded, so a malformed message never kills a
receive loop; the caller counts it (and may answer control requests with an
ErrorReply). Request/reply helpers (`hello`, `request_snapshot`) raise.

Threads: a ZeroMQ socket must be used by one thread at a time. Methods that
touch different sockets (e.g. `recv_rollout` and `publish`) may run in
different threads; `close` must run when no other method is running.

Security: by default everything binds to 127.0.0.1. Binding or connecting to
another host needs CURVE keys (encryption; plus client authentication when the
learner lists `allowed_client_keys`), or an explicit `allow_insecure=True`.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import zmq
import zmq.auth.thread

from rapid_async.wire.protocol import (
    ActorStats,
    DeltaRequest,
    ErrorReply,
    EvalResult,
    Heartbeat,
    Hello,
    Message,
    ProtocolError,
    Rejoin,
    RolloutGroup,
    SnapshotRequest,
    WeightUpdate,
    Welcome,
    WorkGrant,
    WorkRequest,
    decode,
    encode,
)
from rapid_async.wire.security import CurveCredentials, CurveKeys, check_secure, is_loopback, new_curve_keys, require_curve

__all__ = ["ActorSockets", "BadMessage", "BindError", "CurveKeys", "LearnerRestarted",
           "LearnerSockets", "is_loopback", "new_curve_keys"]

DEFAULT_HOST = "127.0.0.1"
MAX_INBOUND_BYTES = 256 * 1024 * 1024  # learner side: larger messages from an actor drop its connection
MAX_PEERS = 4096  # control identities remembered for broadcast (least recently heard dropped first)


class LearnerRestarted(RuntimeError):
    """The learner answered a request with Rejoin: it does not know this actor
    (it restarted from a checkpoint). Say Hello again and take a snapshot."""


@dataclass(frozen=True)
class BadMessage:
    """A received message that could not be decoded (it was consumed and discarded).

    Attributes:
        reason: what was wrong, from ProtocolError.
        socket: "rollouts", "weights" or "control".
    """

    reason: str
    socket: str


class BindError(ValueError):
    """The learner could not bind a socket; the text names the address and the fix."""


def tcp_endpoint(host: str, port: int | str) -> str:
    """tcp://HOST:PORT, with an IPv6 host in brackets (tcp://[::1]:5555)."""
    host = host.strip("[]")
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def bind_error_message(endpoint: str, host: str, port: int, exc: zmq.ZMQError) -> str:
    """A bind failure explained: which address, why, and what to change."""
    if exc.errno == zmq.EADDRINUSE:
        hint = (f"port {port} is in use (another learner?): set transport.port to a free "
                "port, or 0 to pick one")
    elif exc.errno == zmq.EADDRNOTAVAIL or ":" in host:
        hint = (f"{host!r} is not an address of this machine (is IPv6 enabled?): set "
                "transport.host = \"127.0.0.1\"")
    else:
        hint = "check transport.host and transport.port"
    return f"cannot bind {endpoint}: {exc.strerror}; {hint}"


def _recv_decoded(sock: zmq.Socket, name: str, timeout_ms: int, routed: bool = False):
    """Receives one whole multipart message; returns (identity, msg | BadMessage) or None on timeout."""
    if not sock.poll(timeout_ms, zmq.POLLIN):
        return None
    frames = sock.recv_multipart()
    identity = frames.pop(0) if routed else None
    try:
        return identity, decode(frames)
    except ProtocolError as exc:
        return identity, BadMessage(str(exc), name)
    except Exception as exc:  # a decoder bug must not kill the receive loop either
        return identity, BadMessage(f"could not decode ({type(exc).__name__}: {exc})", name)


def _expect(msg, cls: type, name: str):
    """msg if it is a cls (or already a BadMessage), else a BadMessage naming the type."""
    if isinstance(msg, (cls, BadMessage)):
        return msg
    return BadMessage(f"expected {cls.__name__} on the {name} socket, got {type(msg).__name__}", name)


def _reachable(endpoint: str, control_endpoint: str) -> str:
    """A learner bound to a wildcard (0.0.0.0, ::, *) advertises it; connect to
    the host we reached its control socket on instead."""
    match = re.fullmatch(r"tcp://(.*):(\d+)", endpoint)
    if not match or match.group(1).strip("[]") not in ("0.0.0.0", "::", "*"):
        return endpoint
    host = re.fullmatch(r"tcp://(.*):\d+", control_endpoint)
    return f"tcp://{host.group(1)}:{match.group(2)}" if host else endpoint


class LearnerSockets:
    """The learner's three bound sockets.

    Args:
        host: interface to bind (127.0.0.1 by default).
        rollout_port, weights_port, control_port: 0 picks a free port.
        rollout_hwm: PULL receive high-water mark, in messages (per actor).
        weights_hwm: PUB send high-water mark, in messages (per actor).
        curve_keys: the learner's CURVE keypair; enables encryption on all sockets.
        allowed_client_keys: actors' public keys; when given, only they may connect.
        allow_insecure: allow a non-loopback host without CURVE.
        advertise_host: host put in the endpoints sent to actors (default: host).
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        rollout_port: int = 0,
        weights_port: int = 0,
        control_port: int = 0,
        rollout_hwm: int = 8,
        weights_hwm: int = 2,
        curve_keys: CurveKeys | None = None,
        allowed_client_keys: list[bytes] | None = None,
        allow_insecure: bool = False,
        advertise_host: str | None = None,
    ):
        check_secure(host, curve_keys is not None, allow_insecure)
        self._ctx = zmq.Context()
        self._auth = None
        self._curve_keys = curve_keys
        self._advertise = advertise_host or host
        # Control identities that have sent anything, newest last; bounded (an
        # LRU of MAX_PEERS) so that many short-lived connections cannot grow it.
        self.peers: OrderedDict[bytes, None] = OrderedDict()
        try:
            if curve_keys is not None:
                self._start_curve(allowed_client_keys)
            # rollouts: PULL, bound here, one PUSH per actor. Fair-queued across
            # actors. RCVHWM messages wait here per actor (plus the actor's SNDHWM
            # and kernel buffers); when full the actors' sends BLOCK (backpressure).
            self._rollouts = self._bind(zmq.PULL, host, rollout_port, rcvhwm=rollout_hwm)
            # weights: PUB, bound here, one SUB per actor. SNDHWM messages per
            # subscriber; when a slow subscriber's queue is full its updates are
            # DROPPED (PUB never blocks). The actor sees the version gap and asks
            # for a snapshot on control. New subscribers miss earlier messages.
            self._weights = self._bind(zmq.PUB, host, weights_port, sndhwm=weights_hwm)
            # control: ROUTER, bound here, one DEALER per actor. Default HWMs. A
            # reply to an actor that has gone is dropped silently (never blocks).
            self._control = self._bind(zmq.ROUTER, host, control_port)
        except BaseException:
            self.close()
            raise

    def _start_curve(self, allowed_client_keys: list[bytes] | None) -> None:
        require_curve()
        if allowed_client_keys is not None:
            self._auth = zmq.auth.thread.ThreadAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve_callback("*", credentials_provider=CurveCredentials(allowed_client_keys))

    def _bind(self, kind: int, host: str, port: int, sndhwm: int = 1000, rcvhwm: int = 1000) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        sock.linger = 0
        sock.sndhwm, sock.rcvhwm = sndhwm, rcvhwm
        if kind != zmq.PUB:
            sock.maxmsgsize = MAX_INBOUND_BYTES
        if self._curve_keys is not None:
            sock.curve_server = True
            sock.curve_publickey, sock.curve_secretkey = self._curve_keys
        endpoint = tcp_endpoint(host, port or "*")
        if ":" in host:
            sock.ipv6 = True
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)  # an unclosed socket would hang Context.term forever
            raise BindError(bind_error_message(endpoint, host, port, exc)) from None
        return sock

    def _endpoint(self, sock: zmq.Socket) -> str:
        port = sock.last_endpoint.decode().rsplit(":", 1)[1]
        return tcp_endpoint(self._advertise, port)

    @property
    def rollout_endpoint(self) -> str:
        """Where actors connect their PUSH, e.g. "tcp://127.0.0.1:41234"."""
        return self._endpoint(self._rollouts)

    @property
    def weights_endpoint(self) -> str:
        """Where actors connect their SUB."""
        return self._endpoint(self._weights)

    @property
    def control_endpoint(self) -> str:
        """Where actors connect their DEALER: the one address an actor is given."""
        return self._endpoint(self._control)

    def welcome(self, policy_version: int, settings: dict, session: str = "") -> Welcome:
        """The Welcome reply to a Hello, carrying this learner's endpoints (and
        the actor's session secret for its heartbeats)."""
        return Welcome(self.rollout_endpoint, self.weights_endpoint, policy_version, settings,
                       session)

    def poll(self, timeout_ms: int) -> set[str]:
        """Waits until rollouts or control has a message; returns the ready names."""
        poller = zmq.Poller()
        poller.register(self._rollouts, zmq.POLLIN)
        poller.register(self._control, zmq.POLLIN)
        ready = dict(poller.poll(timeout_ms))
        return {name for name, sock in (("rollouts", self._rollouts), ("control", self._control)) if sock in ready}

    def recv_rollout(self, timeout_ms: int = 0) -> RolloutGroup | BadMessage | None:
        """Next rollout group, a BadMessage for an undecodable one, or None after timeout_ms."""
        got = _recv_decoded(self._rollouts, "rollouts", timeout_ms)
        return None if got is None else _expect(got[1], RolloutGroup, "rollouts")

    def publish(self, update: WeightUpdate) -> None:
        """Sends a weight update to every connected actor (never blocks; slow ones drop it)."""
        self._weights.send_multipart(encode(update), copy=False)

    def poll_control(self, timeout_ms: int = 0) -> tuple[bytes, Message | BadMessage] | None:
        """Next control request as (actor identity, message or BadMessage), or None after timeout_ms."""
        got = _recv_decoded(self._control, "control", timeout_ms, routed=True)
        if got is not None:
            self.peers[got[0]] = None
            self.peers.move_to_end(got[0])
            while len(self.peers) > MAX_PEERS:
                self.peers.popitem(last=False)
        return got

    def reply(self, identity: bytes, msg: Message) -> None:
        """Sends a control message to one actor (dropped if that actor is gone)."""
        self._control.send_multipart([identity, *encode(msg)], copy=False)

    def broadcast(self, msg: Message) -> int:
        """Sends a control message (e.g. Stop) to every actor seen; returns how many."""
        for identity in self.peers:
            self.reply(identity, msg)
        return len(self.peers)

    def close(self) -> None:
        """Closes the sockets at once (linger 0) and the context."""
        for name in ("_rollouts", "_weights", "_control"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()


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
            got = _recv_decoded(self._control, "control", left_ms)
            if got is None:
                break
            msg = got[1]
            if isinstance(msg, cls):
                return msg
            if isinstance(msg, ErrorReply):
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
            RuntimeError: if the learner answers with an ErrorReply.
        """
        self._send_control(Hello(self.actor_id, pid, engine, session))
        welcome = self._await_reply(Welcome, timeout_ms, "hello")
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

        Returns:
            True if queued; False if the queue stayed full (the learner is behind):
            keep the group, service weights / control, and try again.
        """
        self._require_hello()
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
        got = _recv_decoded(self._weights, "weights", timeout_ms)
        return None if got is None else _expect(got[1], WeightUpdate, "weights")

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
        got = _recv_decoded(self._control, "control", timeout_ms)
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
