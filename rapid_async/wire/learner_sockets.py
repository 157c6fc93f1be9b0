"""The learner's ZeroMQ sockets: bound, three of them (`LearnerSockets`).

Used by the learner process (its network thread, `learner/network.py`, owns
them); `rapid_async.wire.transport` describes the sockets and re-exports this
module's names. By default everything binds to 127.0.0.1; binding another
interface needs CURVE keys (`wire/security.py`) or `allow_insecure=True`.
A bind that fails raises `BindError`, naming the address and the fix.
"""

from __future__ import annotations

from collections import OrderedDict

import zmq
import zmq.auth.thread

from rapid_async.wire.connections import ConnectionGuard
from rapid_async.wire.protocol import Message, RolloutGroup, WeightUpdate, Welcome, encode
from rapid_async.wire.receive import BadMessage, expect, recv_decoded
from rapid_async.wire.security import CurveCredentials, CurveKeys, check_secure, require_curve

DEFAULT_HOST = "127.0.0.1"
MAX_INBOUND_BYTES = 256 * 1024 * 1024  # learner side: larger messages from an actor drop its connection
MAX_PEERS = 4096  # control identities remembered for broadcast (least recently heard dropped first)


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
        max_connections: most open connections per socket, as (control,
            rollouts, weights); 0 in a place: no cap (`wire/connections.py`).
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
        max_connections: tuple[int, int, int] = (0, 0, 0),
    ):
        check_secure(host, curve_keys is not None, allow_insecure)
        self._ctx = zmq.Context()
        self._auth = None
        self._curve_keys = curve_keys
        self._advertise = advertise_host or host
        # Control identities that have sent anything, newest last; bounded (an
        # LRU of MAX_PEERS) so that many short-lived connections cannot grow it.
        self.peers: OrderedDict[bytes, None] = OrderedDict()
        # Connection caps: the control connection of an identity that holds an
        # actor session (`keeps_identity`, set by the learner) and a rollouts
        # connection that delivered an accepted group are shut down last.
        self.keeps_identity = lambda identity: False
        self._fd_identity: dict[int, bytes] = {}
        self._trusted_rollouts: set[int] = set()
        self.last_rollout_fd: int | None = None
        self._max_connections = max_connections
        self.guards: dict[str, ConnectionGuard] = {}
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
            self._guard_all()
        except BaseException:
            self.close()
            raise

    def _guard_all(self) -> None:
        control, rollouts, weights = self._max_connections
        self.guards = {
            "control": ConnectionGuard(
                self._control, "control", control,
                protect=lambda fd: self.keeps_identity(self._fd_identity.get(fd)),
                on_gone=lambda fd: self._fd_identity.pop(fd, None)),
            "rollouts": ConnectionGuard(self._rollouts, "rollouts", rollouts,
                                        protect=self._trusted_rollouts.__contains__,
                                        on_gone=self._trusted_rollouts.discard),
            "weights": ConnectionGuard(self._weights, "weights", weights)}

    def pump_connections(self) -> None:
        """Apply the sockets' connection events; shut connections down past the caps."""
        for guard in self.guards.values():
            guard.pump()

    def trust_last_rollout(self) -> None:
        """The last rollout received was accepted: its connection is kept over others."""
        if self.last_rollout_fd is not None:
            self._trusted_rollouts.add(self.last_rollout_fd)

    def open_connections(self) -> dict[str, int]:
        """Open connections per socket (as the monitors last reported them)."""
        return {name: len(g.open) for name, g in self.guards.items()}

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
        source: list = []
        got = recv_decoded(self._rollouts, "rollouts", timeout_ms, source=source)
        if got is None:
            return None
        self.last_rollout_fd = source[0]
        self.guards["rollouts"].seen(source[0])
        return expect(got[1], RolloutGroup, "rollouts")

    def publish(self, update: WeightUpdate) -> None:
        """Sends a weight update to every connected actor (never blocks; slow ones drop it)."""
        self._weights.send_multipart(encode(update), copy=False)

    def poll_control(self, timeout_ms: int = 0) -> tuple[bytes, Message | BadMessage] | None:
        """Next control request as (actor identity, message or BadMessage), or None after timeout_ms."""
        source: list = []
        got = recv_decoded(self._control, "control", timeout_ms, routed=True, source=source)
        if got is not None:
            if source[0] is not None:
                self._fd_identity[source[0]] = got[0]
                self.guards["control"].seen(source[0])
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
        for guard in getattr(self, "guards", {}).values():
            guard.close()
        for name in ("_rollouts", "_weights", "_control"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

