"""CURVE keys and the loopback rule for the ZeroMQ sockets of `rapid_async.wire.transport`.

Used by both the learner and the actor processes (through the transport). The
rule: sockets bind / connect to loopback addresses unless CURVE keys are given
(ZeroMQ CURVE: encryption, and client authentication when the learner lists the
actors' public keys) or the user passes allow_insecure=True.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple

import zmq


class CurveKeys(NamedTuple):
    """A CURVE keypair, Z85-encoded (40 bytes each)."""

    public: bytes
    secret: bytes


def new_curve_keys() -> CurveKeys:
    """Generates a CURVE keypair (needs libzmq built with libsodium: zmq.has("curve"))."""
    require_curve()
    return CurveKeys(*zmq.curve_keypair())


def require_curve() -> None:
    """Raises RuntimeError if this libzmq cannot do CURVE."""
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq has no CURVE support; install a pyzmq wheel built with libsodium")


def is_loopback(endpoint_or_host: str) -> bool:
    """True for ipc:// and inproc:// endpoints and for loopback hosts (127.x, ::1, localhost)."""
    match = re.match(r"^(\w+)://(.*)$", endpoint_or_host)
    if match and match.group(1) in ("ipc", "inproc"):
        return True
    host = match.group(2) if match else endpoint_or_host
    host = host.rsplit(":", 1)[0] if match else host  # drop the port
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, "*" or an interface name


def check_secure(where: str, curve: bool, allow_insecure: bool) -> None:
    """Refuses a non-loopback host or endpoint without CURVE unless allow_insecure.

    Args:
        where: a host ("0.0.0.0") or an endpoint ("tcp://10.0.0.2:5555").
        curve: whether CURVE keys were given.
        allow_insecure: the user's explicit opt-out.

    Raises:
        ValueError: naming the address and the two ways out.
    """
    if not is_loopback(where) and not curve and not allow_insecure:
        raise ValueError(
            f"{where} is not a loopback address: pass CURVE keys (see new_curve_keys) "
            "or allow_insecure=True to send rollouts and weights unencrypted"
        )


class CurveCredentials:
    """ZAP callback: accepts a client when its public key is in the allowed set."""

    def __init__(self, allowed: list[bytes]):
        self.allowed = set(allowed)

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.allowed
