"""Receiving whole messages without trusting them, for both ends of the wire.

Used by the learner's sockets (`wire/learner_sockets.py`, in the learner
process) and the actor's (`wire/actor_sockets.py`, in actor processes). A
receive consumes the whole multipart message and returns a `BadMessage`
(reason, socket) instead of raising when it cannot be decoded, so a malformed
message never kills a receive loop; the caller counts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import zmq

from rapid_async.wire.protocol import ProtocolError, decode, peek_fields


@dataclass(frozen=True)
class BadMessage:
    """A received message that could not be decoded (it was consumed and discarded).

    Attributes:
        reason: what was wrong, from ProtocolError.
        socket: "rollouts", "weights" or "control".
        fields: the header's (unchecked) scalar fields when the header was
            readable, else None (a broken rollout group names its grant).
    """

    reason: str
    socket: str
    fields: dict | None = None


def recv_decoded(sock: zmq.Socket, name: str, timeout_ms: int, routed: bool = False,
                 source: list | None = None):
    """Receives one whole multipart message; returns (identity, msg | BadMessage) or None on timeout.
    With `source` (a list), the file descriptor of the connection it came from
    is appended to it (ZeroMQ's SRCFD; None where unknown)."""
    if not sock.poll(timeout_ms, zmq.POLLIN):
        return None
    if source is None:
        frames = sock.recv_multipart()
    else:
        raw = sock.recv_multipart(copy=False)
        try:
            source.append(raw[-1].get(zmq.SRCFD))
        except zmq.ZMQError:
            source.append(None)
        frames = [f.bytes for f in raw]
    identity = frames.pop(0) if routed else None
    try:
        return identity, decode(frames)
    except ProtocolError as exc:
        return identity, BadMessage(str(exc), name, peek_fields(frames))
    except Exception as exc:  # a decoder bug must not kill the receive loop either
        return identity, BadMessage(f"could not decode ({type(exc).__name__}: {exc})", name)


def expect(msg, cls: type, name: str):
    """msg if it is a cls (or already a BadMessage), else a BadMessage naming the type."""
    if isinstance(msg, (cls, BadMessage)):
        return msg
    return BadMessage(f"expected {cls.__name__} on the {name} socket, got {type(msg).__name__}", name)

