"""Who the learner's actors are: one session per actor id, bound to a connection.

Used by the learner's network thread (`rapid_async.learner.network`). An
actor id belongs to the control connection (ZeroMQ routing identity) that said
Hello with it; the actor's heartbeats come from a second connection and carry
the session's secret instead. So a request that names an actor is believed
only from that actor's own connection: nobody can give up, or ask for, another
actor's work. A second Hello with a live actor's id from another connection is
refused; once the old one has been silent for `actor_timeout` seconds it is
taken for gone and the new one takes over (a restarted actor).

An actor that reconnects with its secret (it took the learner for gone and
dropped what it had generated) gets its earlier work taken back and handed
out again, its evaluation job too (`on_lost`): else heartbeats would keep
those grants live forever (issue 16, item 3).

At most `max_actors` sessions exist. A Hello beyond that forgets one actor to
make room: one that never delivered (silent ones first, else the oldest
Hello), else a silent one, else the one that delivered least recently, if
over `actor_timeout` ago; its work goes to others. An actor that delivered is
never forgotten while a session that never delivered exists, so a flood of
Hellos with new ids cannot lock out working actors, and a new actor gets in
(it is the last newcomer to go). When every session
delivered recently the Hello is refused and the actor retries later. The
scheduler forgets actors silent much longer, and the network thread drops
their sessions. The learner's per-actor state stays bounded.
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
    reconnects: int = 0


class Sessions:
    """actor id -> Session, bounded.

    Args:
        max_actors: most sessions at once (learner.max_actors).
        actor_timeout: seconds of silence after which an actor counts as gone.
        scheduler: the work scheduler (liveness: `silent_for`, `eviction_order`;
            `forget` and `release` hand an actor's work to others).
        on_lost: called with (actor id, reason) when an actor's earlier
            incarnation is gone (reconnected, replaced, forgotten): e.g. to
            hand its evaluation job to another actor.
    """

    def __init__(self, max_actors: int, actor_timeout: float, scheduler: Any,
                 on_lost: Any = None):
        self.max_actors = max_actors
        self.actor_timeout = actor_timeout
        self.scheduler = scheduler
        self.on_lost = on_lost or (lambda actor_id, reason: None)
        self._by_id: dict[str, Session] = {}
        self._beats: dict[bytes, str] = {}  # heartbeat connection -> actor id
        self.evicted = 0
        self.released = 0  # prompts taken back from actors that reconnected

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
            # The same actor on a new connection: it dropped what it had
            # generated for the old one, so its grants go to others now.
            session.identity = identity
            session.reconnects += 1
            self.released += self.scheduler.release(actor_id)
            self.scheduler.seen(actor_id)
            self.on_lost(actor_id, "the actor reconnected")
            return session, ""
        if session is not None:
            if self.scheduler.silent_for(actor_id) <= self.actor_timeout:
                return None, (f"actor id {actor_id[:40]!r} is in use by a live actor; give "
                              "every actor a unique --actor-id")
            self.scheduler.forget(actor_id)  # the old incarnation is gone
            del self._by_id[actor_id]
            self.on_lost(actor_id, "replaced by a new actor of that id")
        if len(self._by_id) >= self.max_actors and not self._evict_one():
            return None, (f"the learner already serves learner.max_actors = {self.max_actors} "
                          "actors that all delivered recently; retry later")
        session = self._by_id[actor_id] = Session(identity, secrets.token_hex(16))
        self.scheduler.seen(actor_id)
        return session, ""

    def victim(self) -> str | None:
        """The session to forget for a newcomer: one that never delivered (a
        silent one first, else the oldest Hello), else a silent one, else the
        one that delivered least recently if that was over `actor_timeout` ago;
        None if there is none. An actor that delivered is only forgotten when
        no session that never delivered is left (a flood of Hellos can delay
        its heartbeats, but not cost it its session)."""
        known = self.scheduler.eviction_order()
        seen = set(known)
        order = [a for a in self._by_id if a not in seen] + [a for a in known if a in self._by_id]
        ages = {a: self.scheduler.last_delivery_age(a) for a in order}
        fresh = [a for a in order if ages[a] == float("inf")]  # never delivered, oldest first
        delivered = [a for a in order if ages[a] != float("inf")]
        for group in (fresh, delivered):
            for actor_id in group:
                if self.scheduler.silent_for(actor_id) > self.actor_timeout:
                    return actor_id
            if group is fresh and fresh:
                return fresh[0]
        old = [a for a in delivered if ages[a] > self.actor_timeout]
        return old[0] if old else None

    def _evict_one(self) -> bool:
        """Make room by forgetting `victim()`; its work goes to others."""
        actor_id = self.victim()
        if actor_id is None:
            return False
        self.drop(actor_id)
        self.scheduler.forget(actor_id)
        self.on_lost(actor_id, "forgotten to make room for a new actor")
        self.evicted += 1
        return True

    def heartbeat(self, actor_id: str, token: str) -> bool:
        """True if the beat carries `actor_id`'s secret (compared in constant time)."""
        session = self._by_id.get(actor_id)
        return session is not None and hmac.compare_digest(session.token, token)

    def beat_from(self, identity: bytes, actor_id: str) -> None:
        """`actor_id`'s valid heartbeats come from connection `identity`."""
        self._beats[identity] = actor_id
        if len(self._beats) > 2 * self.max_actors:  # oldest first; live ones beat again
            self._beats.pop(next(iter(self._beats)))

    def holds(self, identity: bytes | None) -> bool:
        """True if connection `identity` belongs to a live session: its Hello
        connection or the one its heartbeats come from (kept open over others)."""
        if identity is None:
            return False
        if self._beats.get(identity) in self._by_id:
            return True
        return any(s.identity == identity for s in self._by_id.values())

    def bound(self, identity: bytes, actor_id: str) -> bool:
        """True if `actor_id` said Hello on this connection."""
        session = self._by_id.get(actor_id)
        return session is not None and session.identity == identity

    def drop(self, actor_id: str) -> None:
        self._by_id.pop(actor_id, None)
