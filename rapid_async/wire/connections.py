"""A cap on the TCP connections of one bound learner socket (`ConnectionGuard`).

Used by `LearnerSockets` (wire/learner_sockets.py) for each of its three
sockets. ZeroMQ accepts every connection a bound socket is offered and has no
option to refuse one, so a client that opens thousands of connections holds
thousands of file descriptors in the learner (issue 21). The guard watches
the socket's monitor (accepted, disconnected, closed), knows each open
connection's file descriptor and peer address, and learns from received
messages (`zmq.SRCFD`) which connection was active when. Past
`max_connections` it shuts one connection down (shutdown(2) on a duplicate of
the descriptor: ZeroMQ's I/O thread then sees the peer gone and closes its
side itself; the descriptor is never closed under it):

- the least recently active connection that is not protected, where a new
  connection counts as the most recent (so a flood's idle connections go
  first and a newcomer gets in);
- the new one itself when every other connection is protected.

Protected connections are those `protect` says yes to: for the control socket
the ones whose routing identity holds an actor session, for the rollouts
socket the ones that delivered an accepted group. The weights socket (PUB)
receives nothing, so nothing there is protected and the least recently
accepted connection goes first; its subscriber reconnects by itself and
catches up by the delta chain or a snapshot.

Before a shutdown the descriptor's peer address is compared with the one seen
at accept time, so a descriptor number that ZeroMQ closed and the kernel gave
to another socket is never touched.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import OrderedDict
from typing import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("rapid.wire")

EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED


def _peer_and_close(fd: int, shut_if_peer: tuple | None = None) -> tuple | None:
    """Peer address of `fd` (None if not a connected socket); if it equals
    `shut_if_peer`, shutdown(2) the connection too. Works on a duplicate of the
    descriptor, which is closed again (ZeroMQ's own stays open)."""
    try:
        new = os.dup(fd)
    except OSError:
        return None
    try:
        sock = socket.socket(fileno=new)
    except OSError:
        os.close(new)
        return None
    try:
        peer = sock.getpeername()
        if shut_if_peer is not None and peer == shut_if_peer:
            sock.shutdown(socket.SHUT_RDWR)
        return peer
    except OSError:
        return None
    finally:
        sock.close()


class ConnectionGuard:
    """Bounds the open connections of one bound ZeroMQ socket.

    Args:
        sock: the bound socket (its monitor is attached here).
        name: the socket's name, for logs.
        max_connections: most open connections (0: no cap, only counting).
        protect: fd -> True if that connection must not be shut down while
            another can be (default: none is protected).
        on_gone: called with the fd of each connection that closed or was shut down.
    """

    def __init__(self, sock: zmq.Socket, name: str, max_connections: int,
                 protect: Callable[[int], bool] | None = None,
                 on_gone: Callable[[int], object] | None = None):
        self.name = name
        self.max_connections = max_connections
        self.protect = protect or (lambda fd: False)
        self.on_gone = on_gone or (lambda fd: None)
        self.monitor = sock.get_monitor_socket(EVENTS)
        self._sock = sock
        self.open: OrderedDict[int, tuple | None] = OrderedDict()  # fd -> peer; least recent first
        self.shut_down = 0
        self.accepted = 0

    def seen(self, fd: int | None) -> None:
        """A message arrived on connection `fd`: it becomes the most recently active."""
        if fd is not None and fd in self.open:
            self.open.move_to_end(fd)

    def pump(self) -> None:
        """Apply every pending monitor event; shut connections down past the cap."""
        while self.monitor.poll(0, zmq.POLLIN):
            event = recv_monitor_message(self.monitor)
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.accepted += 1
                self.open[fd] = _peer_and_close(fd)
                self.open.move_to_end(fd)
                if self.max_connections and len(self.open) > self.max_connections:
                    self._shed(fd)
            else:
                self.open.pop(fd, None)
                self.on_gone(fd)

    def _shed(self, newcomer: int) -> None:
        """Shut down one connection: the least recently active unprotected
        one, else the newcomer."""
        victim = next((fd for fd in self.open if fd != newcomer and not self.protect(fd)),
                      newcomer)
        peer = self.open.pop(victim)
        self.on_gone(victim)
        if peer is not None and _peer_and_close(victim, shut_if_peer=peer) == peer:
            self.shut_down += 1
            n = self.shut_down
            if n <= 20 or n & (n - 1) == 0:
                log.warning("%s socket: more than %d connections; shut one down (%s) "
                            "(%d so far)", self.name, self.max_connections, peer, n)

    def close(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
