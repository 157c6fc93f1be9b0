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

This module is the one place to import the sockets from; the code lives in
`learner_sockets.py` (the learner's bound sockets, bind errors),
`actor_sockets.py` (an actor's connected sockets and its heartbeat socket) and
`receive.py` (undecodable messages become `BadMessage`s).
"""

from __future__ import annotations

from rapid_async.wire.actor_sockets import (ActorSockets, HeartbeatSocket, HelloRefused,
                                             LearnerRestarted)
from rapid_async.wire.learner_sockets import (
    DEFAULT_HOST,
    MAX_INBOUND_BYTES,
    MAX_PEERS,
    BindError,
    LearnerSockets,
    bind_error_message,
    tcp_endpoint,
)
from rapid_async.wire.receive import BadMessage
from rapid_async.wire.security import CurveKeys, is_loopback, new_curve_keys

__all__ = ["ActorSockets", "BadMessage", "BindError", "CurveKeys", "DEFAULT_HOST",
           "HeartbeatSocket", "HelloRefused", "LearnerRestarted", "LearnerSockets", "MAX_INBOUND_BYTES",
           "MAX_PEERS", "bind_error_message", "is_loopback", "new_curve_keys", "tcp_endpoint"]
