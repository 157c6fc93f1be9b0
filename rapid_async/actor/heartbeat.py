"""The actor's heartbeat thread: "still alive" to the learner, also while generating.

Used by the actor process (`rapid_async.actor.loop`). `engine.generate` holds
the actor's main thread for a whole chunk, which with real models takes
minutes; the learner must not take that for a departed actor and hand its
work to others. So a daemon thread sends a `Heartbeat` every
`actor.heartbeat_s` seconds on a control connection of its own
(`ActorSockets.open_heartbeat`: ZeroMQ sockets are single-thread), carrying the
session secret from the learner's Welcome. It reads `actor.sockets` and
`actor.session` at every beat, so an actor that reconnects (new sockets, new
session) keeps beating on the new connection.

The learner therefore hears from a live actor whatever its main thread does;
an actor process that dies stops beating, and its work is reissued after
`learner.actor_timeout_s`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger("rapid.actor")


class Heartbeat(threading.Thread):
    """Beats for `actor` (anything with `.sockets` and `.session`) until `stop()`.

    Args:
        actor: the actor whose sockets and session to use.
        interval_s: seconds between beats.
    """

    def __init__(self, actor: Any, interval_s: float):
        super().__init__(name="actor-heartbeat", daemon=True)
        self.actor = actor
        self.interval_s = interval_s
        self.sent = 0
        self.dropped = 0
        self._halt = threading.Event()

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread and close its socket (before the actor closes its own)."""
        self._halt.set()
        if self.is_alive():
            self.join(timeout=timeout)

    def run(self) -> None:
        sock, owner = None, None
        try:
            while not self._halt.is_set():
                sockets = self.actor.sockets
                if sockets is not owner:  # first beat, or the actor reconnected
                    if sock is not None:
                        sock.close()
                    sock, owner = sockets.open_heartbeat(), sockets
                if sock.beat(self.actor.session):
                    self.sent += 1
                else:
                    self.dropped += 1
                self._halt.wait(self.interval_s)
        except Exception as exc:  # never take the actor down; the learner will notice silence
            log.warning("heartbeat thread stopped: %s", exc)
        finally:
            if sock is not None:
                sock.close()
