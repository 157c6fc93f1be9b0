"""CURVE keys and the loopback rule for the ZeroMQ sockets of `rapid_async.wire.transport`.

Used by both the learner and the actor processes (through the transport), and
by `rapid-keys`. The rule: sockets bind / connect to loopback addresses unless
CURVE keys are given (ZeroMQ CURVE: encryption, and client authentication when
the learner lists the actors' public keys) or the user passes allow_insecure=True.

Key files are ZeroMQ certificates (`zmq.auth`): NAME.key holds a public key,
NAME.key_secret the public and the secret key (mode 0600). `write_key_pair`
makes a pair (`rapid-keys`); the `load_*` functions read them for the config
fields `transport.curve_secret_key`, `curve_public_key` and `authorized_keys`,
raising ValueError that names the field and the file.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from pathlib import Path
from typing import NamedTuple

import zmq
import zmq.auth


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


# ---------------------------------------------------------------- key files


def write_key_pair(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Make a CURVE key pair: DIR/NAME.key (public) and DIR/NAME.key_secret (0600).

    Raises:
        ValueError: if either file exists already (keys are never overwritten).
    """
    require_curve()
    directory = Path(directory)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"key name {name!r}: use letters, digits, '.', '_' or '-'")
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise ValueError(f"{path} exists; remove it or choose another --name")
    directory.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(umask)
    public.chmod(0o644)
    return public, secret


def _z85_key(key: bytes | None, field: str, path: Path) -> bytes:
    if key is None or len(key) != 40:
        raise ValueError(f"{field} = {str(path)!r}: not a CURVE key file (expected a 40-character "
                         "Z85 key, as written by rapid-keys)")
    return key


def _read_certificate(path: str | Path, field: str) -> tuple[bytes, bytes | None]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{field} = {str(path)!r}: no such file (make keys with rapid-keys)")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{field} = {str(path)!r}: not a CURVE key file ({exc})") from None
    return _z85_key(public, field, path), secret


def load_secret_key(path: str | Path, field: str = "transport.curve_secret_key") -> CurveKeys:
    """This process's key pair from a NAME.key_secret file."""
    require_curve()
    public, secret = _read_certificate(path, field)
    secret = _z85_key(secret, field, Path(path))
    if zmq.curve_public(secret) != public:
        raise ValueError(f"{field} = {str(path)!r}: its public and secret keys do not belong together")
    return CurveKeys(public, secret)


def load_public_key(path: str | Path, field: str = "transport.curve_public_key") -> bytes:
    """A public key from a NAME.key (or NAME.key_secret) file."""
    return _read_certificate(path, field)[0]


def load_authorized_keys(path: str | Path, field: str = "transport.authorized_keys") -> list[bytes]:
    """Public keys allowed to connect: one key file, or every *.key file in a directory."""
    path = Path(path)
    if path.is_dir():
        keys = [load_public_key(p, field) for p in sorted(path.glob("*.key"))]
        if not keys:
            raise ValueError(f"{field} = {str(path)!r}: the directory holds no *.key file")
        return keys
    return [load_public_key(path, field)]


def learner_curve(transport) -> tuple[CurveKeys | None, list[bytes] | None]:
    """The learner's CURVE settings from `transport` (a TransportConfig):
    (its key pair, the actors' public keys), or (None, None) without CURVE."""
    if not transport.curve_secret_key:
        return None, None
    keys = load_secret_key(transport.curve_secret_key)
    if transport.curve_public_key and load_public_key(transport.curve_public_key) != keys.public:
        raise ValueError(f"transport.curve_public_key = {transport.curve_public_key!r} is not the "
                         f"public key of transport.curve_secret_key = {transport.curve_secret_key!r}")
    return keys, load_authorized_keys(transport.authorized_keys)


def rollout_tag(session: str, actor_id: str, prompt_id: str, grant_id: int) -> str:
    """The `session_tag` of a rollout group: an HMAC-SHA256 (hex, 128 bits),
    keyed with the session secret of the actor's Welcome, of the actor id,
    prompt id and grant id. A client that knows another actor's grant id (they
    are logged) cannot deliver for it without that actor's secret."""
    message = f"{actor_id}\0{prompt_id}\0{grant_id}".encode()
    return hmac.new(session.encode(), message, hashlib.sha256).hexdigest()[:32]
