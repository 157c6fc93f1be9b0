"""The learner's answers on the control socket: hello, heartbeats, requests.

Used by the learner process: `ControlHandlers` is a mixin of its network
thread (`learner/network.py`, `LearnerNetwork`), which owns the sockets and
provides `sockets`, `sessions`, `scheduler`, `buffer`, `evals`, `counters`,
`welcome_settings`, `weights_source`, `_bad`, the published version and the
weights it serves (`_published_version`, `_chain`, `_snapshot_cache`,
`_snapshot_waiting`). These methods run on that thread only.

An actor id is bound to the control connection that said Hello with it;
requests naming it from another connection are refused with an ErrorReply,
and requests from an actor id with no session here get a Rejoin reply.
Work requests get generation work or, first, a held-out evaluation job.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("rapid.learner")


class ControlHandlers:
    """Control messages in, replies out (a mixin of `LearnerNetwork`)."""

    def _serve_control(self, timeout_ms: int, limit: int = 64) -> int:
        """Answer up to `limit` waiting control messages (waiting up to
        timeout_ms for the first); returns how many."""
        n = 0
        while n < limit:
            got = self.sockets.poll_control(timeout_ms=timeout_ms if n == 0 else 0)
            if got is None:
                return n
            n += 1
            self._handle_control(*got)
        return n

    def _handle_control(self, identity: bytes, msg: Any) -> None:
        from rapid_async.wire.protocol import (ActorStats, DeltaRequest, ErrorReply, EvalResult,
                                               Heartbeat, Hello, Rejoin, SnapshotRequest,
                                               WorkRequest)
        from rapid_async.wire.transport import BadMessage

        if isinstance(msg, BadMessage):
            self._bad("control", msg.reason)
            if identity is not None:
                self.sockets.reply(identity, ErrorReply(message=msg.reason))
        elif isinstance(msg, Hello):
            self._hello(identity, msg)
        elif isinstance(msg, Heartbeat):
            self._heartbeat(msg, identity)
        elif isinstance(msg, (WorkRequest, SnapshotRequest, DeltaRequest, ActorStats)) or (
                isinstance(msg, EvalResult) and self.evals is not None):
            if msg.actor_id not in self.sessions:
                # No session here (this learner restarted, or forgot a silent
                # actor): the actor must say Hello again and resynchronise by
                # snapshot before it works.
                self.counters["control/rejoin_asked"] += 1
                self.sockets.reply(identity, Rejoin(
                    reason=f"actor {msg.actor_id[:40]!r} is not known to this learner; "
                           "say Hello"))
            elif self._bound(identity, msg):
                self._request(identity, msg)
        else:
            self._bad("control", f"unexpected {type(msg).__name__} on the control socket")
            self.sockets.reply(identity, ErrorReply(
                message=f"the learner does not accept {type(msg).__name__} messages"))

    def _hello(self, identity: bytes, msg: Any) -> None:
        from rapid_async.wire.protocol import ErrorReply

        known = msg.actor_id in self.sessions
        session, refusal = self.sessions.hello(identity, msg.actor_id, msg.session)
        if session is None:
            self._bad("control", f"Hello from {msg.actor_id[:40]!r} refused: {refusal}")
            self.sockets.reply(identity, ErrorReply(message=refusal))
            return
        if not known:
            log.info("actor %s (pid %d, engine %s) joined", msg.actor_id, msg.pid, msg.engine)
        self.sockets.reply(identity, self.sockets.welcome(
            self._published_version, self.welcome_settings, session=session.token))

    def _heartbeat(self, msg: Any, identity: bytes | None = None) -> None:
        if not self.sessions.heartbeat(msg.actor_id, msg.session):
            self._bad("control", f"heartbeat for {msg.actor_id[:40]!r} without its session")
            return
        if identity is not None:
            self.sessions.beat_from(identity, msg.actor_id)
        self.scheduler.seen(msg.actor_id)
        if self.evals is not None:  # an actor evaluating for long is alive too
            self.evals.heard(msg.actor_id)
        self.counters["control/heartbeats"] += 1

    def _bound(self, identity: bytes, msg: Any) -> bool:
        """True if msg's actor said Hello on this connection; else refuse it."""
        from rapid_async.wire.protocol import ErrorReply

        if self.sessions.bound(identity, msg.actor_id):
            return True
        name = type(msg).__name__
        self._bad("control", f"{name} for actor {msg.actor_id[:40]!r} from a connection "
                             "that did not say Hello as that actor")
        self.sockets.reply(identity, ErrorReply(
            message=f"{name} refused: actor {msg.actor_id[:40]!r} is unknown on this "
                    "connection; send Hello first"))
        return False

    def _request(self, identity: bytes, msg: Any) -> None:
        """A request from an actor on its own connection."""
        from rapid_async.wire.protocol import ActorStats, DeltaRequest, EvalResult, SnapshotRequest

        self.scheduler.seen(msg.actor_id)
        if isinstance(msg, SnapshotRequest):
            self._snapshot_waiting.append(identity)
            self._answer_snapshot_requests()
        elif isinstance(msg, DeltaRequest):
            self.sockets.reply(identity, self._delta_from(msg.base_version))
        elif isinstance(msg, ActorStats):
            self.sessions[msg.actor_id].stats = dict(msg.stats)
            if self.evals is not None:
                self.evals.heard(msg.actor_id)
            if msg.stats.get("leaving"):
                self.scheduler.forget(msg.actor_id)
                self.sessions.drop(msg.actor_id)
                if self.evals is not None:
                    self.evals.release(msg.actor_id, "the actor left")
        elif isinstance(msg, EvalResult):
            def refused() -> int:
                return self.evals.counters["refused_actor"] + self.evals.counters["refused_version"]

            before = refused()
            if not self.evals.answer(msg, newest_version=self._published_version):
                if refused() > before:  # refused, not merely late
                    self.counters["evals/refused"] += 1
                log.info("evaluation result (job %d from %s) not recorded",
                         msg.job_id, msg.actor_id[:40])
        else:  # WorkRequest
            self._answer_work_request(identity, msg)

    def _answer_work_request(self, identity: bytes, msg: Any) -> None:
        """Grant generation work, or hand out an evaluation job first.

        rapid-async: a waiting evaluation goes before generation work (it then
        runs at the newest weights the actor holds). Synchronous modes: only
        once the round's work is handed out, so the actor evaluates the round's
        version while the learner trains on the round. An actor asking for
        zero groups is a dedicated evaluator. The EvalTask goes out first, then
        the (then empty) WorkGrant that the actor waits for.
        """
        from rapid_async.learner.scheduler import Grant
        from rapid_async.wire.protocol import EvalTask, WorkGrant

        version = self._published_version
        evaluator = msg.max_groups == 0
        grant, job = Grant([], version, 0), None
        if self.scheduler.sync and not evaluator:
            grant = self.scheduler.grant(msg.actor_id, msg.max_groups, len(self.buffer), version)
        if not grant.indices and self.evals is not None:
            self.evals.heard(msg.actor_id, evaluator)
            job = self.evals.take(msg.actor_id, evaluator)
        if job is not None:
            self.sockets.reply(identity, EvalTask(**job[1]))
            self.counters["evals/handed_out"] += 1
        elif not self.scheduler.sync and not evaluator:
            grant = self.scheduler.grant(msg.actor_id, msg.max_groups, len(self.buffer), version)
        self.sockets.reply(identity, WorkGrant(prompt_indices=grant.indices,
                                               min_version=grant.min_version,
                                               grant_id=grant.grant_id))

    def _delta_from(self, base_version: int) -> Any:
        """The kept delta whose base is `base_version`, or an ErrorReply."""
        from rapid_async.wire.protocol import ErrorReply

        for update in self._chain:
            if update.base_version == base_version:
                self.counters["weights/chain_served"] += 1
                return update
        return ErrorReply(message=f"no kept delta starts at version {base_version}; "
                                  "ask for a snapshot")

    def _answer_snapshot_requests(self, built_for_them: bool = False) -> None:
        """Reply to waiting snapshot requests with the cached snapshot if it is
        current (or was just built for them: a newer delta may have been
        published meanwhile, which the actor then takes from the chain); else
        ask the publisher to build one (it arrives through snapshot_ready)."""
        if not self._snapshot_waiting:
            return
        cache = self._snapshot_cache
        if cache is None or (cache.version < self._published_version and not built_for_them):
            if self.weights_source is not None:
                self.weights_source.request_snapshot()
            return
        for identity in self._snapshot_waiting:
            self.counters["weights/snapshots_served"] += 1
            self.sockets.reply(identity, cache)
        self._snapshot_waiting.clear()
