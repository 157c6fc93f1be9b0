"""Rollout groups into the learner's buffer: the checks each group must pass.

Used by the learner process: `RolloutIntake` is a mixin of its network thread
(`learner/network.py`, `LearnerNetwork`), which provides `sockets`,
`sessions`, `scheduler`, `buffer`, `validator`, `cfg`, `counters`, `_count`,
`_bad` and the published version. These methods run on that thread only.

A group enters the buffer only if it answers a live grant of the actor it
names (else dropped: duplicate, late, ungranted, wrong_actor), is signed with
that actor's session (`session_tag`, else dropped: unauthenticated; its grant
stays live) and passes the `GroupValidator` (else rejected by reason; its
prompt goes out again). A group that fails to decode but whose readable
header names a live grant with a valid tag releases that grant at once.

When every group that answered a grant has been rejected for
`learner.stop_after_rejected_s` seconds and at least
`learner.stop_after_rejected_groups` groups, none accepted, the actors and
the learner disagree (task, prompt settings, model) and no step can ever
come: the thread sets `starved`, and `check()` raises `NoUsableGroups` in the
training loop, which ends the run with an error and its end record.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("rapid.learner")


class NoUsableGroups(RuntimeError):
    """Every group that answered a grant was rejected for too long: no step can come."""


class RolloutIntake:
    """Rollouts socket in, buffer out (a mixin of `LearnerNetwork`)."""

    def _pump_rollouts(self, limit: int = 64) -> int:
        from rapid_async.wire.protocol import RolloutGroup
        from rapid_async.wire.transport import BadMessage

        n = 0
        while n < limit:
            msg = self.sockets.recv_rollout(timeout_ms=0)
            if msg is None:
                return n
            n += 1
            if isinstance(msg, BadMessage):
                self._bad("rollouts", msg.reason)
                self._release_broken(msg.fields)
            elif not isinstance(msg, RolloutGroup):
                self._bad("rollouts", f"expected a rollout group, got {type(msg).__name__}")
            else:
                self._intake(msg)
        return n

    def _intake(self, group: Any) -> None:
        """Grant check, field checks, then into the buffer; or count why not."""
        from rapid_async.learner.scheduler import ACCEPTED
        from rapid_async.learner.validate import prompt_index

        where = f"group {group.prompt_id[:40]!r} (grant {group.grant_id}) from {group.actor_id[:40]!r}"
        index = prompt_index(group.prompt_id)
        verdict, min_version = (self.scheduler.check(group.actor_id, index, group.grant_id)
                                if index is not None else ("ungranted", 0))
        if verdict != ACCEPTED:
            self._count(f"rollouts/dropped_{verdict}", f"{where} dropped")
            return
        if not self._signed(group.actor_id, group.prompt_id, group.grant_id, group.session_tag):
            self._count("rollouts/dropped_unauthenticated",
                        f"{where} dropped: not signed with that actor's session")
            return  # the grant stays live: its actor may still deliver it
        problem = self._validate(group, index, min_version)
        if problem is not None:
            self.scheduler.revoke(index, group.grant_id)  # the prompt goes out again
            reason, text = problem
            self._count(f"rollouts/rejected_{reason}", f"{where} rejected: {text}")
            self._note_rejected(reason)
            return
        verdict = self.scheduler.delivered(group.actor_id, index, group.grant_id)
        if verdict != ACCEPTED:  # withdrawn meanwhile (a new round opened)
            self._count(f"rollouts/dropped_{verdict}", f"{where} dropped")
            return
        self.buffer.put(group)
        self.sockets.trust_last_rollout()
        self.counters["rollouts/groups"] += 1
        self._rejected.clear()

    def _signed(self, actor_id: str, prompt_id: str, grant_id: int, tag: Any) -> bool:
        """True if `tag` is the session tag of `actor_id`'s live session."""
        import hmac

        from rapid_async.wire.security import rollout_tag

        if actor_id not in self.sessions or not isinstance(tag, str):
            return False
        expected = rollout_tag(self.sessions[actor_id].token, actor_id, prompt_id, grant_id)
        return hmac.compare_digest(expected, tag)

    def _release_broken(self, fields: dict | None) -> None:
        """A rollout group that failed to decode: if its readable header names
        a live grant of its actor with a valid session tag, hand the prompt out
        again now (instead of at the grant's deadline)."""
        from rapid_async.learner.scheduler import ACCEPTED
        from rapid_async.learner.validate import prompt_index

        if not fields:
            return
        actor_id, prompt_id, grant_id = (fields.get(k) for k in ("actor_id", "prompt_id",
                                                                  "grant_id"))
        if not (isinstance(actor_id, str) and isinstance(prompt_id, str)
                and isinstance(grant_id, int)):
            return
        index = prompt_index(prompt_id)
        if index is None or self.scheduler.check(actor_id, index, grant_id)[0] != ACCEPTED:
            return
        if self._signed(actor_id, prompt_id, grant_id, fields.get("session_tag")):
            self.scheduler.revoke(index, grant_id)
            self.counters["rollouts/released_undecodable"] += 1

    def _note_rejected(self, reason: str) -> None:
        """Count a rejection with none accepted since; stop the run once they
        have gone on for learner.stop_after_rejected_s and _groups."""
        lb, now = self.cfg.learner, time.monotonic()
        if not self._rejected:
            self._rejecting_since = now
        self._rejected[reason] += 1
        n, lasted = sum(self._rejected.values()), now - self._rejecting_since
        if (self.starved is None and lb.stop_after_rejected_s > 0
                and n >= lb.stop_after_rejected_groups and lasted >= lb.stop_after_rejected_s):
            reasons = ", ".join(f"{r} {c}" for r, c in self._rejected.most_common())
            self.starved = (
                f"every group that answered a grant for {lasted:.0f} s was rejected ({n} groups: "
                f"{reasons}) and none accepted: the actors and this learner disagree about the "
                "task, the prompt settings or the model (e.g. a resumed run changed task.* and an "
                "actor kept the old ones); stopping (learner.stop_after_rejected_s = "
                f"{lb.stop_after_rejected_s:g}, learner.stop_after_rejected_groups = "
                f"{lb.stop_after_rejected_groups})")
            log.error("%s", self.starved)

    def _validate(self, group: Any, index: int, min_version: int) -> tuple[str, str] | None:
        if self.validator is None:
            return None
        try:
            return self.validator.check(group, index, min_version, self._published_version)
        except Exception as exc:  # a check that cannot run refuses the group
            return "invalid", f"could not be checked ({type(exc).__name__}: {exc})"
