"""Finding the learner again: work requests that notice a lost learner, rejoin.

Used by the actor process (`rapid_async.actor.loop`): `Rejoining` is a mixin
of the `Actor`, which provides `actor_id`, `sockets`, `cfg`, `run_dir`,
`control_endpoint`, `learner_id`, `session`, `engine_name`, `eval_tasks`,
`stats` and `_snapshot` (actor/intake.py).

If the learner stops answering (a request times out, or a send stays blocked
and a ping gets no answer) or answers Rejoin (it restarted and does not know
this actor), the actor says Hello again, to the endpoint in RUN_DIR/learner.json
when it can read it, and takes a snapshot: its weights may be ahead of or
behind the restored version.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("rapid.actor")


class Rejoining:
    """Requests that may find the learner gone, and saying Hello again (a mixin of `Actor`)."""

    def _timeout_ms(self, at_least_s: float = 0.0) -> int:
        return int(max(self.cfg.actor.learner_timeout_s, at_least_s) * 1000)

    def _request_work(self, max_groups: int) -> Any:
        """A WorkGrant, or None if the learner did not answer or asked us to
        rejoin (then we have said Hello again and hold its current weights).
        A grant larger than asked for is cut (and counted): no reply makes
        the actor take on unbounded work."""
        from rapid_async.wire.transport import LearnerRestarted

        try:
            grant = self.sockets.request_work(max_groups, timeout_ms=self._timeout_ms())
        except (LearnerRestarted, TimeoutError) as exc:
            self.rejoin(str(exc))
            return None
        self._grant_learner = self.learner_id  # whose grant it is
        if len(grant.prompt_indices) > max_groups:
            self.stats["bad_control"] += 1
            log.warning("actor %s: grant of %d prompts for %d asked; keeping %d", self.actor_id,
                        len(grant.prompt_indices), max_groups, max_groups)
            grant.prompt_indices = grant.prompt_indices[:max_groups]
        return grant

    def _learner_endpoint(self) -> str:
        """The control endpoint in RUN_DIR/learner.json (a restarted learner may
        have moved), else the one we used last."""
        try:
            info = json.loads((Path(self.run_dir) / "learner.json").read_text())
            return str(info["control"])
        except (OSError, ValueError, KeyError, TypeError):
            return self.control_endpoint

    def rejoin(self, reason: str) -> None:
        """Say Hello again (new sockets) until a learner answers, then take its
        snapshot. Raises TimeoutError after `actor.rejoin_timeout_s`."""
        from rapid_async.config import config_from_dict
        from rapid_async.wire.transport import ActorSockets

        log.warning("actor %s: %s; saying Hello again", self.actor_id, reason)
        self.stats["rejoins"] += 1
        deadline = time.monotonic() + self.cfg.actor.rejoin_timeout_s
        while True:
            self.sockets.close()
            self.control_endpoint = self._learner_endpoint()
            self.sockets = ActorSockets(self.control_endpoint, self.actor_id, **self._curve)
            try:
                welcome = self.sockets.hello(os.getpid(), self.engine_name, timeout_ms=5000,
                                             session=self.session)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"no learner answered at {self.control_endpoint} for "
                        f"{self.cfg.actor.rejoin_timeout_s:.0f} s (actor.rejoin_timeout_s)") from None
        self.cfg = config_from_dict(welcome.settings["config"])  # a resumed run may change it
        self.learner_id = welcome.settings.get("learner_id")
        self.session = welcome.session  # the heartbeat thread reads it at each beat
        self.eval_tasks.clear()  # jobs of the learner that has gone
        log.info("actor %s: rejoined the learner at %s (version %d)", self.actor_id,
                 self.control_endpoint, welcome.policy_version)
        self._snapshot("rejoin")

    def _same_learner(self) -> bool:
        """A ping (Hello on the same sockets): True if the learner we know
        answers; else rejoin whichever answers now and return False."""
        try:
            welcome = self.sockets.hello(os.getpid(), self.engine_name,
                                         timeout_ms=self._timeout_ms())
        except (TimeoutError, RuntimeError) as exc:
            self.rejoin(str(exc))
            return False
        if welcome.settings.get("learner_id") != self.learner_id:
            self.rejoin("the learner restarted")
            return False
        return True

