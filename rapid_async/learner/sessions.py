"""Who the learner's actors are: one session per actor id, bound to a connection.

Used by the learner's network thread (`rapid_async.learner.network`). An
actor id belongs to the control connection (ZeroMQ routing identity) that said
Hello with it; the actor's heartbeats come from a second connection and carry
the session's secret instead. So a request that names an actor is believed
only from that actor's own connection: nobody can give up, or ask for, another
actor's work. A second Hello with a live actor's id from another connection is
refused; once the old one has been silent for `actor_timeout` seconds it is
taken for gone and the new one takes over (a restarted actor).

At most `max_actors` sessions exist. A Hello beyond that forgets the longest
silent actor that holds no work (silent for at least `actor_timeout`), or is
refused; the scheduler forgets actors silent much longer, and the network
thread drops their sessions. The learner's per-actor state stays bounded.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Session:
    """One actor: its control connection, heartbeat secret and last stats."""

    identity: bytes
    token: str
    stats: dict = field(default_factory=dict)


class Sessions:
    """actor id -> Session, bounded.

    Args:
        max_actors: most sessions at once (learner.max_actors).
        actor_timeout: seconds of silence after which an actor counts as gone.
        scheduler: the work scheduler (liveness: `silent_for`, `idle_actors`;
            `forget` hands a replaced actor's work to others).
    """

    def __init__(self, max_actors: int, actor_timeout: float, scheduler: Any):
        self.max_actors = max_actors
        self.actor_timeout = actor_timeout
        self.scheduler = scheduler
        self._by_id: dict[str, Session] = {}
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, actor_id: str) -> bool:
        return actor_id in self._by_id

    def __getitem__(self, actor_id: str) -> Session:
        return self._by_id[actor_id]

    def identities(self) -> list[bytes]:
        return [s.identity for s in list(self._by_id.values())]

    def hello(self, identity: bytes, actor_id: str,
              token: str = "") -> tuple[Session | None, str]:
        """Open (or keep) the session of `actor_id` on `identity`. An actor
        that reconnects proves it holds the session with its `token`.

        Returns:
            (session, "") or (None, why it was refused).
        """
        session = self._by_id.get(actor_id)
        if session is not None and session.identity == identity:
            return session, ""  # the same connection says Hello again
        if session is not None and token and secrets.compare_digest(token, session.token):
            session.identity = identity  # the same actor on a new connection
            return session, ""
        if session is not None:
            if self.scheduler.silent_for(actor_id) <= self.actor_timeout:
                return None, (f"actor id {actor_id[:40]!r} is in use by a live actor; give "
                              "every actor a unique --actor-id")
            self.scheduler.forget(actor_id)  # the old incarnation is gone
            del self._by_id[actor_id]
        if len(self._by_id) >= self.max_actors and not self._evict_one():
            return None, f"the learner already serves learner.max_actors = {self.max_actors} actors"
        session = self._by_id[actor_id] = Session(identity, secrets.token_hex(16))
        self.scheduler.seen(actor_id)
        return session, ""

    def _evict_one(self) -> bool:
        """Make room by forgetting the longest silent actor that holds no work."""
        for actor_id in self.scheduler.idle_actors(min_silence=self.actor_timeout):
            self.drop(actor_id)
            self.scheduler.forget(actor_id)
            self.evicted += 1
            return True
        return False

    def heartbeat(self, actor_id: str, token: str) -> bool:
        """True if the beat carries `actor_id`'s secret (compared in constant time)."""
        session = self._by_id.get(actor_id)
        return session is not None and hmac.compare_digest(session.token, token)

    def bound(self, identity: bytes, actor_id: str) -> bool:
        """True if `actor_id` said Hello on this connection."""
        session = self._by_id.get(actor_id)
        return session is not None and session.identity == identity

    def drop(self, actor_id: str) -> None:
        self._by_id.pop(actor_id, None)
