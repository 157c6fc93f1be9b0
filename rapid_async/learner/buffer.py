"""Staleness-aware rollout buffer, used by the learner process.

The buffer holds whole groups (the K completions of one prompt); a group is
never split. Each group carries the policy version that generated it. When the
learner takes a mini-batch at version u, groups with u - v > max_staleness are
dropped and counted; the rest come out oldest first.

Capacity is enforced upstream, by the learner's work scheduler: it never hands
out more work than the buffer can hold, so a group that arrives is always
accepted (accepted data is not lost) and actors wait for work instead of piling
up stale rollouts. The buffer is shared between the learner's network thread
(put) and its training loop (take), so every method takes a lock.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any


class RolloutBuffer:
    """FIFO of rollout groups with a staleness bound.

    Args:
        max_staleness: largest accepted u - v, in policy versions.
    """

    def __init__(self, max_staleness: int):
        if max_staleness < 0:
            raise ValueError(f"max_staleness = {max_staleness} must be >= 0")
        self.max_staleness = max_staleness
        self._groups: deque[Any] = deque()
        self._cond = threading.Condition()
        self.accepted = 0
        self.dropped_stale = 0
        self.consumed = 0
        self.consumed_staleness: Counter[int] = Counter()
        self._dropped_ids: list[str] = []

    def __len__(self) -> int:
        with self._cond:
            return len(self._groups)

    def put(self, group: Any) -> None:
        """Add one group (anything with a `policy_version` attribute)."""
        with self._cond:
            self._groups.append(group)
            self.accepted += 1
            self._cond.notify_all()

    def drop_stale(self, version: int) -> int:
        """Drop groups older than `version - max_staleness`; return how many."""
        with self._cond:
            return self._drop_stale_locked(version)

    def _drop_stale_locked(self, version: int) -> int:
        keep = deque(g for g in self._groups
                     if version - g.policy_version <= self.max_staleness)
        dropped = len(self._groups) - len(keep)
        if dropped:
            kept = set(map(id, keep))
            self._dropped_ids.extend(getattr(g, "prompt_id", None) for g in self._groups
                                     if id(g) not in kept)
        self._groups = keep
        self.dropped_stale += dropped
        return dropped

    def pop_dropped(self) -> list[str]:
        """Prompt ids of the groups dropped as stale since the last call (the
        learner records them with the step, so that every prompt is accounted for)."""
        with self._cond:
            out, self._dropped_ids = self._dropped_ids, []
            return out

    def take(self, n: int, version: int, timeout: float | None = None) -> list[Any] | None:
        """Take the `n` oldest fresh groups for an update at policy `version`.

        Stale groups are dropped first. Waits up to `timeout` seconds (None:
        forever) for enough groups; returns None on timeout, leaving the
        buffer as it was apart from the stale drops.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                self._drop_stale_locked(version)
                if len(self._groups) >= n:
                    out = [self._groups.popleft() for _ in range(n)]
                    self.consumed += n
                    return out
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(timeout=0.5 if remaining is None else min(remaining, 0.5))

    def record_consumed(self, groups: list[Any], version: int) -> None:
        """Record the staleness of groups used in an update at `version`
        (in rapid-sync one batch taken at version v feeds H updates)."""
        with self._cond:
            for g in groups:
                self.consumed_staleness[version - g.policy_version] += 1

    def prompt_ids(self) -> list[str]:
        """The prompt ids of the groups waiting in the buffer."""
        with self._cond:
            return [getattr(g, "prompt_id", None) for g in self._groups]

    def stats(self) -> dict[str, Any]:
        """Counters for metrics.jsonl."""
        with self._cond:
            return {
                "buffer/size": len(self._groups),
                "buffer/accepted": self.accepted,
                "buffer/dropped_stale": self.dropped_stale,
                "buffer/consumed": self.consumed,
                "staleness/hist": {str(k): v for k, v in sorted(self.consumed_staleness.items())},
            }
