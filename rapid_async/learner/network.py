"""The learner's network thread: every learner socket, actors, buffer input.

Used by the learner process (`rapid_async.learner.loop`). ZeroMQ sockets are
not thread-safe, so one thread owns them all: it answers actors on the control
socket (hello, work requests, snapshot requests, stats), moves arriving rollout
groups into the buffer, publishes weight updates handed to it by the training
loop, and counts bad messages without dying on them. A failure of this thread
is re-raised in the training loop by `check()`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Any

from rapid_async.config import Config

log = logging.getLogger("rapid.learner")


class LearnerNetwork(threading.Thread):
    """The learner's network thread: sockets, actors, buffer input.

    Args:
        cfg: run config.
        buffer: where arriving groups go.
        scheduler: hands out work to actors.
        welcome_settings: sent to each actor in Welcome (config, model dir).
    """

    def __init__(self, cfg: Config, buffer: Any, scheduler: Any, welcome_settings: dict):
        super().__init__(name="learner-network", daemon=True)
        from rapid_async.wire.transport import LearnerSockets

        self.cfg = cfg
        self.buffer = buffer
        self.scheduler = scheduler
        self.welcome_settings = welcome_settings
        self.sockets = LearnerSockets(host=cfg.transport.host, control_port=cfg.transport.port,
                                      rollout_hwm=cfg.transport.rollout_hwm,
                                      weights_hwm=cfg.transport.weights_hwm)
        self.outbox: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._published: tuple[int, dict] | None = None  # (version, inference state)
        self._snapshot_cache = None
        self.bad_messages: Counter[str] = Counter()
        self.actor_stats: dict[str, dict] = {}
        self.counters: Counter[str] = Counter()

    # -- called from the training loop
    def set_published(self, version: int, state: dict) -> None:
        """Make (version, state) the weights served on snapshot requests."""
        with self._lock:
            self._published = (version, state)

    def publish(self, update: Any) -> None:
        self.outbox.put(("publish", update))

    def call(self, fn: Any, timeout: float = 60.0) -> Any:
        """Run `fn()` on the network thread, between two messages, and return
        its result: a consistent view of what that thread moves (e.g. work
        handed out vs groups in the buffer). Runs directly once it has stopped."""
        if not self.is_alive():
            return fn()
        future: Future = Future()
        self.outbox.put(("call", (fn, future)))
        deadline = time.monotonic() + timeout
        while self.is_alive() and time.monotonic() < deadline:
            try:
                return future.result(timeout=0.2)
            except FuturesTimeout:
                continue
        if future.done():
            return future.result()
        if self.is_alive():
            raise TimeoutError(f"the network thread did not run {fn!r} in {timeout} s")
        return fn()

    def stop_actors(self, reason: str) -> None:
        self.outbox.put(("stop", reason))

    def check(self) -> None:
        """Re-raise a failure of the network thread in the caller."""
        if self.error is not None:
            raise RuntimeError(f"learner network thread failed: {self.error!r}") from self.error

    def shutdown(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    # -- the thread
    def run(self) -> None:
        try:
            last_expire = time.monotonic()
            while not self._halt.is_set():
                self._drain_outbox()
                got = self._pump_rollouts()
                self._serve_control(timeout_ms=0 if got else 5)
                if time.monotonic() - last_expire > 1.0:
                    for actor_id in self.scheduler.expire_silent():
                        log.warning("actor %s went silent; its work is handed to others", actor_id)
                    last_expire = time.monotonic()
            self._drain_outbox()
        except BaseException as exc:  # re-raised by check() in the main loop
            self.error = exc
        finally:
            self.sockets.close()

    def _drain_outbox(self) -> None:
        from rapid_async.wire.protocol import Stop

        while True:
            try:
                kind, item = self.outbox.get_nowait()
            except queue.Empty:
                return
            if kind == "publish":
                self.sockets.publish(item)
                self.counters["weights/published"] += 1
                self.counters["weights/published_bytes"] += len(item.payload)
            elif kind == "stop":
                self.sockets.broadcast(Stop(reason=item))
            elif kind == "call":
                fn, future = item
                try:
                    future.set_result(fn())
                except Exception as exc:
                    future.set_exception(exc)

    def _bad(self, where: str, reason: str) -> None:
        self.bad_messages[where] += 1
        log.warning("bad message on %s socket: %s", where, reason)

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
                continue
            if not isinstance(msg, RolloutGroup):
                self._bad("rollouts", f"expected a rollout group, got {type(msg).__name__}")
                continue
            k = self.cfg.algo.group_size
            if msg.completion_ids.shape[0] != k:
                self._bad("rollouts", f"group {msg.prompt_id} from {msg.actor_id} has "
                          f"{msg.completion_ids.shape[0]} completions, expected K = {k}")
                continue
            try:
                index = int(msg.prompt_id)
            except ValueError:
                index = -1
            self.scheduler.delivered(msg.actor_id, index)
            self.buffer.put(msg)
            self.counters["rollouts/groups"] += 1
        return n

    def _serve_control(self, timeout_ms: int) -> None:
        from rapid_async.wire.protocol import (ActorStats, ErrorReply, Hello, SnapshotRequest,
                                          WorkGrant, WorkRequest)
        from rapid_async.wire.transport import BadMessage

        got = self.sockets.poll_control(timeout_ms=timeout_ms)
        if got is None:
            return
        identity, msg = got
        if isinstance(msg, BadMessage):
            self._bad("control", msg.reason)
            if identity is not None:
                self.sockets.reply(identity, ErrorReply(message=msg.reason))
            return
        if isinstance(msg, Hello):
            self.scheduler.seen(msg.actor_id)
            version = self._published[0] if self._published else 0
            log.info("actor %s (pid %d, engine %s) joined", msg.actor_id, msg.pid, msg.engine)
            self.sockets.reply(identity, self.sockets.welcome(version, self.welcome_settings))
        elif isinstance(msg, WorkRequest):
            version = self._published[0] if self._published else 0
            indices, min_version = self.scheduler.grant(
                msg.actor_id, msg.max_groups, len(self.buffer), version)
            self.sockets.reply(identity, WorkGrant(prompt_indices=indices, min_version=min_version))
        elif isinstance(msg, SnapshotRequest):
            self.scheduler.seen(msg.actor_id)
            self.sockets.reply(identity, self._snapshot())
            self.counters["weights/snapshots_served"] += 1
        elif isinstance(msg, ActorStats):
            self.scheduler.seen(msg.actor_id)
            self.actor_stats[msg.actor_id] = dict(msg.stats)
            if msg.stats.get("leaving"):
                self.scheduler.forget(msg.actor_id)
        else:
            self._bad("control", f"unexpected {type(msg).__name__} on the control socket")
            self.sockets.reply(identity, ErrorReply(
                message=f"the learner does not accept {type(msg).__name__} messages"))

    def _snapshot(self) -> Any:
        from rapid_async.wire.protocol import ErrorReply
        from rapid_async.weights import make_snapshot

        with self._lock:
            published = self._published
        if published is None:
            return ErrorReply(message="no weights published yet; retry shortly")
        version, state = published
        if self._snapshot_cache is None or self._snapshot_cache.version != version:
            self._snapshot_cache = make_snapshot(state, version)
        return self._snapshot_cache
