"""Finding the learner again: work requests that notice a lost learner, rejoin.

Used by the actor process (`rapid_async.actor.loop`): `Rejoining` is a mixin
of the `Actor`, which provides `actor_id`, `sockets`, `cfg`, `run_dir`,
`control_endpoint`, `learner_id`, `session`, `engine_name`, `eval_tasks`,
`stats` and `_snapshot` (actor/intake.py).

If the learner stops answering (a request times out, or a send stays blocked
and a ping gets no answer) or answers Rejoin (it restarted and does not know
this actor), the actor says Hello again, to the endpoint in RUN_DIR/learner.json
when it can read it, and takes a snapshot: its weights may be ahead of or
behind the restored version. The Welcome's config may differ from the one it
started with (a resumed run with `--set task.options.seed=7`): the actor then
rebuilds its task, prompt settings and scorer, and its tokenizer and engine
when the model changed, so that its prompts are the learner's again (issue 21
item 3: an old actor's groups were rejected as prompt_mismatch for ever).

A learner that refuses the Hello (it serves learner.max_actors actors that all
deliver) is asked again with exponential backoff (`hello_with_backoff`), up
to `actor.rejoin_timeout_s`; then the actor stops with a clear error.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("rapid.actor")

BACKOFF_S = (0.5, 30.0)
"""First and longest wait before asking a learner that refused the Hello again."""


def hello_with_backoff(sockets: Any, actor_id: str, engine: str, timeout_ms: int,
                       session: str = "", patience_s: float = 600.0) -> Any:
    """`sockets.hello`, asked again with exponential backoff while the learner
    refuses it (HelloRefused), for up to `patience_s` seconds.

    Raises:
        TimeoutError: refused for `patience_s` (the text says why), or the
            learner did not answer within `timeout_ms`.
    """
    from rapid_async.wire.transport import HelloRefused

    delay, deadline = BACKOFF_S[0], time.monotonic() + patience_s
    while True:
        try:
            return sockets.hello(os.getpid(), engine, timeout_ms=timeout_ms, session=session)
        except HelloRefused as exc:
            if time.monotonic() + delay > deadline:
                raise TimeoutError(f"{exc}; gave up after {patience_s:.0f} s of retries "
                                   "(actor.rejoin_timeout_s)") from None
            log.warning("actor %s: %s; asking again in %.1f s", actor_id, exc, delay)
            time.sleep(delay)
            delay = min(2 * delay, BACKOFF_S[1])


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
        self._grant_epoch = self.stats["rejoins"]  # a rejoin since voids it (its work went back)
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

        from rapid_async.wire.transport import HelloRefused

        log.warning("actor %s: %s; saying Hello again", self.actor_id, reason)
        self.stats["rejoins"] += 1
        deadline = time.monotonic() + self.cfg.actor.rejoin_timeout_s
        delay = BACKOFF_S[0]
        while True:
            self.sockets.close()
            self.control_endpoint = self._learner_endpoint()
            self.sockets = ActorSockets(self.control_endpoint, self.actor_id, **self._curve)
            try:
                welcome = self.sockets.hello(os.getpid(), self.engine_name, timeout_ms=5000,
                                             session=self.session)
                break
            except (TimeoutError, HelloRefused) as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"no learner took this actor at {self.control_endpoint} for "
                        f"{self.cfg.actor.rejoin_timeout_s:.0f} s (actor.rejoin_timeout_s): "
                        f"{exc}") from None
                if isinstance(exc, HelloRefused):  # it answers, but has no room: back off
                    log.warning("actor %s: %s; asking again in %.1f s", self.actor_id, exc, delay)
                    time.sleep(delay)
                    delay = min(2 * delay, BACKOFF_S[1])
        previous, raw = (self._welcome_config, self.model_dir), welcome.settings["config"]
        cfg = config_from_dict(raw)  # a resumed run may change it
        if _field(raw, "actor", "device") == _field(previous[0], "actor", "device"):
            cfg.actor.device = self.cfg.actor.device  # keep a local choice (RAPID_DEVICE)
        self.cfg, self._welcome_config = cfg, raw
        self.model_dir = welcome.settings.get("model_dir", self.model_dir)
        self._reconfigure(*previous)
        self.learner_id = welcome.settings.get("learner_id")
        self.session = welcome.session  # the heartbeat thread reads it at each beat
        self.eval_tasks.clear()  # jobs of the learner that has gone
        log.info("actor %s: rejoined the learner at %s (version %d)", self.actor_id,
                 self.control_endpoint, welcome.policy_version)
        self._snapshot("rejoin")

    def _reconfigure(self, old: dict, old_model_dir: str) -> None:
        """Rebuild what the Welcome's config (`old`: the previous Welcome's)
        changed: the tokenizer and engine when the model, its dtype, the engine
        or its device changed; the task, prompt settings and scorer when the
        task section changed (or the tokenizer did). Weights come by snapshot next."""
        new = self._welcome_config
        engine_keys = [("model", "inference_dtype"), ("actor", "engine"), ("actor", "device")]
        if self.engine_override:  # rapid-actor --engine wins over the config
            engine_keys.remove(("actor", "engine"))
        model_changed = old_model_dir != self.model_dir or any(
            _field(old, a, b) != _field(new, a, b) for a, b in engine_keys)
        if model_changed:
            log.warning("actor %s: the learner's model or engine settings changed; reloading "
                        "the tokenizer and the engine", self.actor_id)
            self.engine.close()
            self._load_engine()
        if model_changed or old.get("task") != new.get("task"):
            log.warning("actor %s: the learner's task settings changed; rebuilding the task, "
                        "prompt settings and scorer", self.actor_id)
            self.stats["reconfigured"] += 1
            close_task = getattr(self.task, "close", None)
            if close_task is not None:
                close_task()
            self._load_task()

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


def _field(raw: dict, section: str, key: str) -> Any:
    """raw[section][key] of a config dict, or None."""
    table = raw.get(section)
    return table.get(key) if isinstance(table, dict) else None
