"""Work scheduling for the three modes, used by the learner process.

Actors ask the learner for work; the scheduler answers with prompt indices (the
task's deterministic training stream) and the oldest policy version the actor
may generate them with. This is where the modes differ:

- `grpo` and `rapid-sync` work in rounds. A round hands out exactly
  `batch_groups` prompts at the current version, then nothing until the learner
  has trained on the whole round and opened the next one with new weights:
  generation waits for training.
- `rapid-async` hands out work whenever the buffer plus the work in flight has
  room (`buffer_groups`): generation goes on while the learner trains, and the
  bounded capacity is the backpressure that keeps actors from piling up stale
  groups.

Work given to an actor that goes silent (no message for `actor_timeout`
seconds) is handed out again, so a departed actor loses no prompt and a
synchronous round still completes. Thread-safe: the network thread grants and
records deliveries, the training loop opens rounds.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class _ActorWork:
    outstanding: dict[int, float] = field(default_factory=dict)  # index -> grant time
    last_seen: float = 0.0


class WorkScheduler:
    """Hands out prompt indices to actors according to the run mode.

    Args:
        mode: "grpo", "rapid-sync" or "rapid-async".
        batch_groups: prompts per round (synchronous modes).
        capacity: buffer + in-flight bound in groups (rapid-async).
        max_staleness: staleness bound, used for the minimum version of a grant.
        start_index: first prompt index (the data position when resuming).
        actor_timeout: seconds of silence after which an actor's work is reissued.
    """

    def __init__(self, mode: str, batch_groups: int, capacity: int, max_staleness: int,
                 start_index: int = 0, actor_timeout: float = 30.0):
        self.mode = mode
        self.sync = mode in ("grpo", "rapid-sync")
        self.batch_groups = batch_groups
        self.capacity = capacity
        self.max_staleness = max_staleness
        self.next_index = start_index
        self.actor_timeout = actor_timeout
        self._lock = threading.Lock()
        self._actors: dict[str, _ActorWork] = {}
        self._reissue: deque[int] = deque()
        self._round_left = 0
        self._round_version = 0
        self.reissued = 0
        self.rejected_unknown = 0

    # -- called by the training loop
    def open_round(self, version: int) -> None:
        """Synchronous modes: start handing out the next `batch_groups` prompts."""
        with self._lock:
            self._round_left = self.batch_groups
            self._round_version = version

    def in_flight(self) -> int:
        with self._lock:
            return sum(len(a.outstanding) for a in self._actors.values())

    # -- called by the network thread
    def seen(self, actor_id: str) -> None:
        with self._lock:
            self._actors.setdefault(actor_id, _ActorWork()).last_seen = time.monotonic()

    def grant(self, actor_id: str, max_groups: int, buffered: int, version: int) -> tuple[list[int], int]:
        """Work for `actor_id`: (prompt indices, minimum policy version)."""
        with self._lock:
            work = self._actors.setdefault(actor_id, _ActorWork())
            work.last_seen = time.monotonic()
            in_flight = sum(len(a.outstanding) for a in self._actors.values())
            if self.sync:
                n = min(max_groups, self._round_left)
                min_version = self._round_version
            else:
                n = min(max_groups, self.capacity - buffered - in_flight)
                # One version of headroom, but never a version not yet trained:
                # with max_staleness 0 training waits for data at `version`.
                min_version = max(0, min(version, version - self.max_staleness + 1))
            indices = []
            for _ in range(max(0, n)):
                if self._reissue:
                    indices.append(self._reissue.popleft())
                else:
                    indices.append(self.next_index)
                    self.next_index += 1
            if self.sync:
                self._round_left -= len(indices)
            now = time.monotonic()
            for i in indices:
                work.outstanding[i] = now
            return indices, min_version

    def delivered(self, actor_id: str, index: int) -> bool:
        """Record a delivered group; False if it was not (or no longer) granted
        to this actor (e.g. reissued after a timeout), in which case the
        caller should still keep the data but not count it twice."""
        with self._lock:
            work = self._actors.setdefault(actor_id, _ActorWork())
            work.last_seen = time.monotonic()
            if work.outstanding.pop(index, None) is None:
                self.rejected_unknown += 1
                return False
            return True

    def expire_silent(self) -> list[str]:
        """Reissue the work of actors silent for `actor_timeout`; return their ids."""
        gone = []
        with self._lock:
            now = time.monotonic()
            for actor_id, work in self._actors.items():
                if work.outstanding and now - work.last_seen > self.actor_timeout:
                    self._reissue.extend(sorted(work.outstanding))
                    self.reissued += len(work.outstanding)
                    if self.sync:
                        self._round_left += len(work.outstanding)
                    work.outstanding.clear()
                    gone.append(actor_id)
        return gone

    def forget(self, actor_id: str) -> None:
        """An actor said goodbye: hand its work to others."""
        with self._lock:
            work = self._actors.pop(actor_id, None)
            if work and work.outstanding:
                self._reissue.extend(sorted(work.outstanding))
                self.reissued += len(work.outstanding)
                if self.sync:
                    self._round_left += len(work.outstanding)

    def pending(self) -> list[int]:
        """Prompts handed out and not yet delivered (at actors, or waiting to be
        handed out again). A checkpoint records them with the buffered ones."""
        with self._lock:
            held = [i for a in self._actors.values() for i in a.outstanding]
            return sorted(set(held) | set(self._reissue))

    def requeue(self, indices: list[int]) -> None:
        """Hand these prompts out before new ones (on resume: the checkpoint's
        pending prompts, granted or buffered before it but never trained)."""
        with self._lock:
            self._reissue.extend(sorted(indices))

    def actors(self) -> list[str]:
        with self._lock:
            return list(self._actors)
