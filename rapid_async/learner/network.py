"""The learner's network thread: every learner socket, actors, buffer input.

Used by the learner process (`rapid_async.learner.loop`). ZeroMQ sockets are
not thread-safe, so one thread owns them all: it answers actors on the control
socket (hello, work requests, snapshot and delta requests, stats; the handlers
are in `learner/control.py`), moves arriving rollout groups into the buffer,
publishes the weight updates that the weight publisher hands it, hands
held-out evaluation jobs to actors and takes their results
(`learner/evaluation.py`), and counts bad messages without dying on them.
The checks of arriving groups are in `learner/intake.py`. A
failure of this thread is re-raised in the training loop by `check()`.

Weights: the thread never encodes anything. It sends each delta it is given
on the PUB socket and keeps the most recent ones (up to
`transport.delta_chain_mb`), so that an actor that missed some catches up
with DeltaRequests instead of a snapshot. A SnapshotRequest is answered from
the snapshot the publisher built for the current version; when there is none
yet, the request waits while the publisher builds it (`weights_source`).

Nothing an actor sends is trusted:
- An actor id is bound to the control connection that said Hello with it
  (and to a session secret for its heartbeats, which come from another
  socket). Requests naming an actor from any other connection are refused, so
  one actor cannot give up or take another's work. At most
  `learner.max_actors` sessions exist; silent ones are forgotten.
- A rollout group is accepted only if it answers a live grant (scheduler) of
  the actor it names, carries that actor's session tag (an HMAC with its
  session secret: knowing a grant id is not enough to deliver for another
  actor) and passes `GroupValidator` (vocabulary, lengths, versions,
  log-probs, prompt). Everything refused is counted by reason
  (`rollouts/dropped_*`, `rollouts/rejected_*`) and logged; a refused but
  granted prompt is handed out again, also when a group that fails to decode
  names its grant in a readable header with a valid tag.
- No actor holds work for ever: grants are capped per actor and taken back
  past a deadline (`learner/limits.py`, `grants/taken_back`).
- When every group that answers a grant is rejected for
  `learner.stop_after_rejected_s` (and `stop_after_rejected_groups` groups),
  learner and actors disagree (task, prompts, model): `check()` raises
  `NoUsableGroups`, the run ends with an error and its end record.

Restarts: control requests from an actor id that has no session here (the
learner restarted, or forgot a silent actor) get a Rejoin reply, so that
actors that outlived a learner say Hello again and resynchronise by snapshot;
their groups answer no live grant and are dropped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Any

from rapid_async.config import Config
from rapid_async.learner.control import ControlHandlers
from rapid_async.learner.intake import NoUsableGroups, RolloutIntake

__all__ = ["LearnerNetwork", "NoUsableGroups", "chain_budget"]

log = logging.getLogger("rapid.learner")

MAX_VERSIONS = 4096  # versions whose served checksums are remembered (oldest dropped first)


class LearnerNetwork(ControlHandlers, RolloutIntake, threading.Thread):
    """The learner's network thread: sockets, actors, buffer input.

    Args:
        cfg: run config.
        buffer: where arriving groups go.
        scheduler: hands out work to actors.
        welcome_settings: sent to each actor in Welcome (config, model dir).
        evals: the EvalBoard of held-out evaluation jobs (None: no evaluations).
        validator: checks groups before they enter the buffer (None: grants only).
    """

    def __init__(self, cfg: Config, buffer: Any, scheduler: Any, welcome_settings: dict,
                 evals: Any = None, validator: Any = None,
                 ports: dict[str, int] | None = None):
        super().__init__(name="learner-network", daemon=True)
        from rapid_async.learner.sessions import Sessions

        self.cfg = cfg
        self.buffer = buffer
        self.scheduler = scheduler
        self.evals = evals
        self.validator = validator
        self.welcome_settings = welcome_settings
        self.sockets = self._bind(ports)
        self.outbox: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._published_version = 0
        self._snapshot_cache: Any = None
        self._snapshot_waiting: list[bytes] = []  # control identities waiting for a snapshot
        self._chain: deque = deque()  # recent deltas, oldest first
        self._chain_bytes = 0
        self.chain_limit_bytes = chain_budget(cfg.transport.delta_chain_mb)
        self.weights_source: Any = None  # has request_snapshot(); set by the learner
        self.sessions = Sessions(cfg.learner.max_actors, cfg.learner.actor_timeout_s, scheduler,
                                 on_lost=self._actor_lost)
        self.sockets.keeps_identity = self.sessions.holds
        self.starved: str | None = None  # why the run must stop (NoUsableGroups)
        self._rejected: Counter[str] = Counter()  # rejections since the last accepted group
        self._rejecting_since = 0.0
        self.bad_messages: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        self.served_checksums: OrderedDict[int, set] = OrderedDict()  # version -> checksums

    def _bind(self, ports: dict[str, int] | None) -> Any:
        """The learner's sockets, on `ports` (a resumed learner's previous
        ones, so running actors find it again) if they are still free, else
        on `transport.port` and free ports."""
        import zmq

        from rapid_async.wire.security import learner_curve
        from rapid_async.wire.transport import LearnerSockets

        t = self.cfg.transport
        curve_keys, allowed = learner_curve(t)  # (None, None) without CURVE
        common = dict(host=t.host, rollout_hwm=t.rollout_hwm, weights_hwm=t.weights_hwm,
                      curve_keys=curve_keys, allowed_client_keys=allowed,
                      max_connections=connection_caps(self.cfg))
        if ports:
            try:
                return LearnerSockets(control_port=t.port or ports["control"],
                                      rollout_port=ports["rollouts"],
                                      weights_port=ports["weights"], **common)
            except (zmq.ZMQError, ValueError) as exc:
                log.warning("could not bind the previous ports %s again (%s); binding new "
                            "ones: actors on this node find them in RUN_DIR/learner.json",
                            ports, exc)
        return LearnerSockets(control_port=t.port, **common)

    # -- called from the training loop and the weight publisher
    def set_published(self, version: int) -> None:
        """The version actors start from (before any delta is published)."""
        self._published_version = version

    def publish(self, update: Any) -> None:
        """Send a delta to every actor (from the thread's next loop) and keep it in the chain."""
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

    def snapshot_ready(self, update: Any) -> None:
        """A snapshot built by the publisher: answer the actors waiting for one."""
        self.outbox.put(("snapshot", update))

    def stop_actors(self, reason: str) -> None:
        self.outbox.put(("stop", reason))

    def check(self) -> None:
        """Re-raise a failure of the network thread in the caller; raise
        NoUsableGroups once every arriving group has been rejected too long."""
        if self.error is not None:
            raise RuntimeError(f"learner network thread failed: {self.error!r}") from self.error
        if self.starved is not None:
            raise NoUsableGroups(self.starved)

    def shutdown(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    # -- the thread
    def run(self) -> None:
        try:
            last_expire = time.monotonic()
            while not self._halt.is_set():
                self._drain_outbox()
                self.sockets.pump_connections()
                got = self._pump_rollouts()
                self._serve_control(timeout_ms=0 if got else 5)
                if time.monotonic() - last_expire > 1.0:
                    self._expire()
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
                self._served(item)
                self._keep_in_chain(item)
                self._published_version = max(self._published_version, item.version)
                self.counters["weights/published"] += 1
                self.counters["weights/published_bytes"] += len(item.payload)
            elif kind == "snapshot":
                self._served(item)
                self._snapshot_cache = item
                self._answer_snapshot_requests(built_for_them=True)
            elif kind == "stop":
                for identity in self.sessions.identities():
                    self.sockets.reply(identity, Stop(reason=item))
            elif kind == "call":
                fn, future = item
                try:
                    future.set_result(fn())
                except Exception as exc:
                    future.set_exception(exc)

    def _expire(self) -> None:
        for actor_id in self.scheduler.expire_silent():
            self.counters["actors/expired"] += 1
            log.warning("actor %s went silent; its work is handed to others", actor_id)
        for actor_id in self.evals.expire_silent() if self.evals else []:
            log.warning("actor %s went silent during an evaluation; it goes to the next actor",
                        actor_id)
        for actor_id, n in self.scheduler.take_back_overdue().items():
            self.counters["grants/taken_back"] += n
            self._count("grants/overdue_actors",
                        f"actor {actor_id[:40]} held {n} prompts past their deadline; they go "
                        "to other actors")
        for actor_id in self.scheduler.prune():
            self.sessions.drop(actor_id)
            self.counters["actors/forgotten"] += 1

    def _actor_lost(self, actor_id: str, reason: str) -> None:
        """An earlier incarnation of `actor_id` is gone (Sessions): its evaluation job goes to others."""
        if "reconnected" in reason:  # evictions are counted by Sessions (net/actors/evicted)
            self.counters["actors/reconnected"] += 1
        if self.evals is not None and self.evals.release(actor_id, reason):
            log.info("actor %s: %s; its evaluation goes to the next actor", actor_id[:40], reason)

    def _count(self, key: str, text: str) -> None:
        """Count a refused message; log the first 20 of each kind, then every power of 2."""
        self.counters[key] += 1
        if (n := self.counters[key]) <= 20 or n & (n - 1) == 0:
            log.warning("%s (%s, %d so far)", text, key, n)

    def _bad(self, where: str, reason: str) -> None:
        self.bad_messages[where] += 1
        if (n := self.bad_messages[where]) <= 20 or n & (n - 1) == 0:
            log.warning("bad message on %s socket: %s (%d so far)", where, reason, n)

    # -- rollouts
    def _served(self, update: Any) -> None:
        """Remember the checksums of the updates served as each version (a
        delta's and a snapshot's differ: each certifies its own header)."""
        self.served_checksums.setdefault(update.version, set()).add(update.checksum)
        while len(self.served_checksums) > MAX_VERSIONS:
            self.served_checksums.popitem(last=False)

    def verified(self, group: Any) -> bool:
        """True if `group` says it came from weights certified by a checksum
        this learner served for its policy version (which the actor verified
        before it generated)."""
        claimed = group.info.get("weights_checksum")
        return claimed in self.served_checksums.get(group.policy_version, ())

    def limit_chain(self, state_bytes: int) -> None:
        """Cap the chain at one inference-dtype state of `state_bytes` (see chain_budget)."""
        self.chain_limit_bytes = chain_budget(self.cfg.transport.delta_chain_mb, state_bytes)

    def _keep_in_chain(self, update: Any) -> None:
        """Keep a published delta; drop the oldest beyond the chain's byte budget."""
        self._chain.append(update)
        self._chain_bytes += len(update.payload)
        while self._chain and self._chain_bytes > self.chain_limit_bytes:
            self._chain_bytes -= len(self._chain.popleft().payload)


def connection_caps(cfg: Config) -> tuple[int, int, int]:
    """Most open connections of the (control, rollouts, weights) sockets:
    `transport.max_connections` on each, else room for `learner.max_actors`
    actors (two control connections each: requests and heartbeats) and 32 more."""
    n = cfg.transport.max_connections
    actors = cfg.learner.max_actors
    return (n, n, n) if n else (2 * actors + 32, actors + 32, actors + 32)


def chain_budget(delta_chain_mb: int, state_bytes: int | None = None) -> int:
    """Bytes of recent deltas worth keeping: `transport.delta_chain_mb`, and
    never more than one uncompressed inference-dtype state (`state_bytes`),
    since an actor further behind than that is better served by a snapshot.
    Without the cap a small model would keep thousands of deltas."""
    budget = delta_chain_mb * (1 << 20)
    return budget if state_bytes is None else min(budget, state_bytes)
