"""The actor's weight intake: snapshots, queued deltas in order, missed deltas.

Used by the actor process (`rapid_async.actor.loop`): `WeightIntake` is a
mixin of the `Actor`, which provides `sockets`, `receiver` (a
`rapid_async.weights.WeightReceiver` over the engine's weights), `stats`,
`actor_id`, `version`, `stopped`, `_check_stop` and `rejoin` (actor/rejoin.py).

Every update is checked and verified before it is written into the engine's
weights; deltas missed because the SUB queue was full are fetched from the
learner's chain of recent deltas, and an update that cannot be applied (not
kept any more, malformed, checksum failure) makes the actor ask for a
snapshot before it generates again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("rapid.actor")


class WeightIntake:
    """Weights in: install, snapshot, poll, order, wait for a version (a mixin of `Actor`)."""

    def _install(self, updates: list[Any]) -> None:
        """Verify and write updates in order, then let the engine load them once.

        Raises:
            NeedSnapshot: at the first update that cannot be applied (those
                before it stay applied).
        """
        t0 = time.perf_counter()
        try:
            for update in updates:
                self.receiver.apply(update)
                self.stats["update_bytes"] += len(update.payload)
                self.stats["snapshots" if update.kind == "snapshot" else "deltas"] += 1
        finally:
            self.receiver.commit()
            self.stats["update_s"] += time.perf_counter() - t0

    def _snapshot(self, reason: str) -> None:
        """Ask for the full weights and install them (retrying while the
        learner has none to give or sends one that fails its checks); return
        early if the learner says stop."""
        from rapid_async.weights import NeedSnapshot
        from rapid_async.wire.transport import LearnerRestarted

        for _ in range(100):
            if self._check_stop():
                return
            try:
                update = self.sockets.request_snapshot(reason, timeout_ms=self._timeout_ms(60))
                self._install([update])
                return
            except (LearnerRestarted, TimeoutError) as exc:
                self.rejoin(str(exc))  # ends with a snapshot of the learner it finds
                return
            except RuntimeError as exc:  # an ErrorReply, e.g. no weights yet
                log.warning("actor %s: %s", self.actor_id, exc)
            except NeedSnapshot as exc:
                self.stats["rejected_updates"] += 1
                log.warning("actor %s: rejected a snapshot: %s", self.actor_id, exc.reason)
            time.sleep(0.2)
        raise RuntimeError("the learner did not send a usable weight snapshot after 100 tries")

    def poll_weights(self, timeout_ms: int = 0) -> None:
        """Apply every queued weight update in order (fetching missed deltas
        from the learner), the engine loading once; a snapshot on any doubt."""
        from rapid_async.weights import NeedSnapshot
        from rapid_async.wire.transport import BadMessage

        queued = []
        while (update := self.sockets.recv_weights(timeout_ms=timeout_ms)) is not None:
            timeout_ms = 0
            if isinstance(update, BadMessage):
                self.stats["rejected_updates"] += 1
                log.warning("actor %s: bad weight update (%s)", self.actor_id, update.reason)
                continue
            queued.append(update)
        if not queued:
            return
        try:
            self._install(self._in_order(queued))
        except NeedSnapshot as exc:
            self.stats["rejected_updates"] += 1
            log.info("actor %s: %s; asking for a snapshot", self.actor_id, exc.reason)
            self._snapshot(exc.reason)

    def _in_order(self, queued: list[Any]) -> list[Any]:
        """The deltas that take our version to the newest queued one, in order;
        gaps (deltas dropped by a full queue) filled from the learner's chain.

        Raises:
            NeedSnapshot: if a missed delta is no longer kept by the learner.
        """
        from rapid_async.weights import NeedSnapshot

        chain, version = [], self.version
        for update in sorted(queued, key=lambda u: u.version):
            if version is None or update.version <= version or update.base_version is None:
                continue  # old, or not a delta: PUB carries deltas only
            while version < update.base_version:
                try:
                    missed = self.sockets.request_delta(version, timeout_ms=30_000)
                except (RuntimeError, TimeoutError) as exc:
                    raise NeedSnapshot(f"missed deltas after version {version}: {exc}") from exc
                if missed.base_version != version or missed.version > update.base_version:
                    raise NeedSnapshot(f"the learner's chain does not lead from {version} "
                                       f"to {update.base_version}")
                self.stats["chain_fetches"] += 1
                chain.append(missed)
                version = missed.version
            if update.base_version == version:
                chain.append(update)
                version = update.version
        return chain

    def _wait_version(self, min_version: int, timeout_s: float = 5.0) -> bool:
        """Wait for weights of at least `min_version` (a snapshot if they do
        not come by PUB in time). Returns False only when the learner said
        stop; the grant is never dropped silently: if the snapshot is still
        older (the learner moved on meanwhile) the work is done anyway and
        the learner's staleness bound decides whether it is used."""
        deadline = time.monotonic() + timeout_s
        while self.version is None or self.version < min_version:
            if self._check_stop():
                return False
            if time.monotonic() > deadline:
                self._snapshot(f"behind: have {self.version}, need {min_version}")
                break
            self.poll_weights(timeout_ms=50)
        return self.stopped is None

