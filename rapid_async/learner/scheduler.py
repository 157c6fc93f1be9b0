"""Work scheduling for the three modes, used by the learner process.

Actors ask the learner for work; the scheduler answers with a `Grant`: prompt
indices (the task's deterministic training stream), the oldest policy version
the actor may generate them with, and a random grant id that the actor echoes
in every `RolloutGroup` it sends back. This is where the modes differ:

- `grpo` and `rapid-sync` work in rounds. A round hands out exactly
  `batch_groups` prompts at the current version, then nothing until the learner
  has trained on the whole round and opened the next one with new weights:
  generation waits for training.
- `rapid-async` hands out work whenever the buffer plus the work in flight has
  room (`buffer_groups`): generation goes on while the learner trains, and the
  bounded capacity is the backpressure that keeps actors from piling up stale
  groups.

Every group is trained at most once. A piece of work is (prompt index, grant
id), and at any time at most one grant per prompt index is live. A delivered
group is accepted only if it answers the live grant of its prompt, from the
actor it was granted to; anything else is refused with a reason: "duplicate"
(already delivered), "late" (the grant was withdrawn and the prompt handed to
another actor), "ungranted" (no such grant) or "wrong_actor".

Work given to an actor that goes silent (no message and no heartbeat for
`actor_timeout` seconds) is handed out again under a new grant, so a departed
actor loses no prompt and a synchronous round still completes. With
`GrantLimits` (`learner/limits.py`; the learner passes its config) an actor
also holds at most its share of the work, and work it holds past a deadline
measured from real deliveries is taken back, even from an actor that
heartbeats (a client that asks for work and never delivers). An actor that
reconnects with its session gets its earlier work taken back (`release`):
what it generated for its old connection was dropped. Actors silent
much longer, with no work, are forgotten: the per-actor state stays bounded.
Thread-safe: the network thread grants and records deliveries, the training
loop opens rounds.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import NamedTuple

from rapid_async.learner.limits import GrantLimits, update_spg

ACCEPTED, DUPLICATE, LATE, UNGRANTED, WRONG_ACTOR = (
    "accepted", "duplicate", "late", "ungranted", "wrong_actor")
CLOSED_MEMORY = 8192
"""Closed (prompt index, grant id) pairs remembered, to tell a duplicate or a
late delivery from an ungranted group; older ones count as ungranted."""


class Grant(NamedTuple):
    """Work for one actor: generate `indices` with weights >= `min_version`."""

    indices: list[int]
    min_version: int
    grant_id: int


@dataclass
class _Live:
    grant_id: int
    actor_id: str
    min_version: int
    granted_at: float = 0.0
    size: int = 1  # prompts in its grant
    deadline: float = float("inf")


@dataclass
class _ActorWork:
    outstanding: set[int] = field(default_factory=set)  # prompt indices with a live grant
    last_seen: float = 0.0
    joined: float = field(default_factory=time.monotonic)
    last_delivery: float = 0.0  # monotonic time of its last accepted group (0: none)
    proven: bool = False  # delivered since it joined or since work was taken back
    spg: float = 0.0  # measured seconds per group of its grants (0: not yet)


class WorkScheduler:
    """Hands out prompt indices to actors according to the run mode.

    Args:
        mode: "grpo", "rapid-sync" or "rapid-async".
        batch_groups: prompts per round (synchronous modes).
        capacity: buffer + in-flight bound in groups (rapid-async).
        max_staleness: staleness bound, used for the minimum version of a grant.
        start_index: first prompt index (the data position when resuming).
        actor_timeout: seconds of silence after which an actor's work is reissued.
        forget_after: seconds of silence after which an actor without work is
            forgotten (default: 10 x actor_timeout, at least 60 s).
        limits: quota and deadline rules (default: none, as before them).
    """

    def __init__(self, mode: str, batch_groups: int, capacity: int, max_staleness: int,
                 start_index: int = 0, actor_timeout: float = 30.0,
                 forget_after: float | None = None, limits: GrantLimits | None = None):
        self.mode = mode
        self.sync = mode in ("grpo", "rapid-sync")
        self.batch_groups = batch_groups
        self.capacity = capacity
        self.max_staleness = max_staleness
        self.next_index = start_index
        self.actor_timeout = actor_timeout
        self.forget_after = forget_after if forget_after is not None else max(60.0, 10 * actor_timeout)
        self._lock = threading.Lock()
        self._actors: dict[str, _ActorWork] = {}
        self._live: dict[int, _Live] = {}  # prompt index -> its one live grant
        self._closed: OrderedDict[tuple[int, int], str] = OrderedDict()
        self._reissue: deque[int] = deque()  # withdrawn work of this round / this run
        self._requeued: deque[int] = deque()  # pending prompts of a checkpoint (resume)
        self._round_left = 0
        self._round_version = 0
        self.reissued = 0
        self.revoked_at_round = 0
        self.limits = limits or GrantLimits()
        self.run_spg = 0.0  # seconds per group over all actors' deliveries
        self.taken_back = 0  # prompts taken back past their deadline
        self.released = 0  # prompts taken back from actors that reconnected

    # -- called by the training loop
    def open_round(self, version: int) -> None:
        """Synchronous modes: start handing out the next `batch_groups` prompts.

        Work of an earlier round that is still out or waiting to be reissued is
        withdrawn (normally there is none: a round is trained only once all of
        it arrived), so nothing of an old round leaks into the new one. Prompts
        requeued from a checkpoint are kept: they belong to no round yet.
        """
        with self._lock:
            self.revoked_at_round += len(self._live) + len(self._reissue)
            for index in list(self._live):
                self._close_locked(index, LATE)
            self._reissue.clear()
            self._round_left = self.batch_groups
            self._round_version = version

    def in_flight(self) -> int:
        with self._lock:
            return len(self._live)

    # -- called by the network thread
    def seen(self, actor_id: str) -> None:
        """The actor is alive (a message, a heartbeat or a delivery came from it)."""
        with self._lock:
            self._actors.setdefault(actor_id, _ActorWork()).last_seen = time.monotonic()

    def silent_for(self, actor_id: str) -> float:
        """Seconds since `actor_id` was last heard of (inf if unknown)."""
        with self._lock:
            work = self._actors.get(actor_id)
            return float("inf") if work is None else time.monotonic() - work.last_seen

    def grant(self, actor_id: str, max_groups: int, buffered: int, version: int) -> Grant:
        """Work for `actor_id`: prompt indices, minimum policy version, grant id."""
        with self._lock:
            work = self._actors.setdefault(actor_id, _ActorWork())
            now = work.last_seen = time.monotonic()
            if self.sync:
                n = min(max_groups, self._round_left)
                min_version = self._round_version
            else:
                n = min(max_groups, self.capacity - buffered - len(self._live))
                # One version of headroom, but never a version not yet trained:
                # with max_staleness 0 training waits for data at `version`.
                min_version = max(0, min(version, version - self.max_staleness + 1))
            if self.limits.max_per_actor is not None:
                n = min(n, self._quota_locked(actor_id, work, now))
            indices = []
            for _ in range(max(0, n)):
                if self._requeued:
                    indices.append(self._requeued.popleft())
                elif self._reissue:
                    indices.append(self._reissue.popleft())
                else:
                    indices.append(self.next_index)
                    self.next_index += 1
            if self.sync:
                self._round_left -= len(indices)
            grant_id = secrets.randbits(62) or 1
            deadline = now + self.limits.deadline_s(len(indices), work.spg, self.run_spg)
            for i in indices:
                self._live[i] = _Live(grant_id, actor_id, min_version, now, len(indices),
                                      deadline)
                work.outstanding.add(i)
            return Grant(indices, min_version, grant_id)

    def _quota_locked(self, actor_id: str, work: _ActorWork, now: float) -> int:
        """How many more prompts `actor_id` may hold now (learner/limits.py)."""
        proven_alive = sum(1 for a, w in self._actors.items() if a != actor_id and w.proven
                           and now - w.last_seen <= self.actor_timeout)
        unproven_held = sum(len(w.outstanding) for w in self._actors.values() if not w.proven)
        bound = self.batch_groups if self.sync else self.capacity
        return self.limits.quota(bound, work.proven, proven_alive, len(work.outstanding),
                                 unproven_held)

    def check(self, actor_id: str, index: int, grant_id: int) -> tuple[str, int]:
        """Would a group for (index, grant_id) from `actor_id` be accepted?

        Returns:
            (verdict, the grant's minimum version); the verdict is ACCEPTED or
            the reason for refusing it. Changes nothing.
        """
        with self._lock:
            return self._verdict_locked(actor_id, index, grant_id)

    def delivered(self, actor_id: str, index: int, grant_id: int) -> str:
        """Record a delivered group; returns ACCEPTED or why it is refused.

        Only an accepted group may be trained on; its grant is closed, so the
        same work delivered again is a DUPLICATE.
        """
        with self._lock:
            verdict, _ = self._verdict_locked(actor_id, index, grant_id)
            work = self._actors.get(actor_id)
            now = time.monotonic()
            if work is not None:
                work.last_seen = now
            if verdict == ACCEPTED:
                live = self._live[index]
                if work is not None:
                    elapsed = now - live.granted_at
                    work.spg = update_spg(work.spg, elapsed, live.size)
                    self.run_spg = update_spg(self.run_spg, elapsed, live.size)
                    work.last_delivery, work.proven = now, True
                self._close_locked(index, DUPLICATE)
            return verdict

    def revoke(self, index: int, grant_id: int) -> bool:
        """The group for this grant was refused (e.g. invalid): hand the prompt
        out again. Returns False if the grant was not live."""
        with self._lock:
            live = self._live.get(index)
            if live is None or live.grant_id != grant_id:
                return False
            self._close_locked(index, LATE)
            self._reissue_locked([index])
            return True

    def expire_silent(self) -> list[str]:
        """Reissue the work of actors silent for `actor_timeout`; return their ids."""
        gone = []
        with self._lock:
            now = time.monotonic()
            for actor_id, work in self._actors.items():
                if work.outstanding and now - work.last_seen > self.actor_timeout:
                    self._withdraw_locked(work)
                    gone.append(actor_id)
        return gone

    def take_back_overdue(self) -> dict[str, int]:
        """Take back work held past its grant's deadline (even from an actor that
        heartbeats) and hand it to others; returns {actor id: prompts taken}.
        The actor is unproven again (a smaller quota) until it delivers."""
        taken: dict[str, int] = {}
        with self._lock:
            now = time.monotonic()
            overdue = [i for i, live in self._live.items() if live.deadline < now]
            for index in overdue:
                actor_id = self._live[index].actor_id
                taken[actor_id] = taken.get(actor_id, 0) + 1
                work = self._actors.get(actor_id)
                if work is not None:
                    work.proven = False
                self._close_locked(index, LATE)
            self._reissue_locked(sorted(overdue))
            self.taken_back += len(overdue)
        return taken

    def release(self, actor_id: str) -> int:
        """The actor reconnected (it dropped what it had generated for its old
        connection): hand its work to others, keep the actor. Returns how many
        prompts went back."""
        with self._lock:
            work = self._actors.get(actor_id)
            if work is None or not work.outstanding:
                return 0
            n = len(work.outstanding)
            self._withdraw_locked(work)
            self.released += n
            return n

    def eviction_order(self) -> list[str]:
        """Known actors, the first to forget first: never delivered before
        delivered, then longest since the last accepted delivery, then the
        oldest join (so the newest newcomer goes last among newcomers)."""
        with self._lock:
            ranked = sorted((w.last_delivery, w.joined, a) for a, w in self._actors.items())
        return [a for _, _, a in ranked]

    def last_delivery_age(self, actor_id: str) -> float:
        """Seconds since `actor_id`'s last accepted group (inf: none, or unknown)."""
        with self._lock:
            work = self._actors.get(actor_id)
            if work is None or not work.last_delivery:
                return float("inf")
            return time.monotonic() - work.last_delivery

    def prune(self) -> list[str]:
        """Forget actors silent for `forget_after` (their work, if any, is reissued)."""
        with self._lock:
            now = time.monotonic()
            stale = [a for a, w in self._actors.items() if now - w.last_seen > self.forget_after]
            for actor_id in stale:
                self._withdraw_locked(self._actors.pop(actor_id))
        return stale

    def forget(self, actor_id: str) -> None:
        """An actor said goodbye: hand its work to others."""
        with self._lock:
            work = self._actors.pop(actor_id, None)
            if work is not None:
                self._withdraw_locked(work)

    def idle_actors(self, min_silence: float) -> list[str]:
        """Actors without work silent for at least `min_silence` s, longest silent first."""
        with self._lock:
            now = time.monotonic()
            idle = [(w.last_seen, a) for a, w in self._actors.items()
                    if not w.outstanding and now - w.last_seen >= min_silence]
        return [a for _, a in sorted(idle)]

    def pending(self) -> list[int]:
        """Prompts handed out and not yet delivered (at actors, or waiting to be
        handed out again). A checkpoint records them with the buffered ones."""
        with self._lock:
            return sorted(set(self._live) | set(self._reissue) | set(self._requeued))

    def requeue(self, indices: list[int]) -> None:
        """Hand these prompts out before new ones (on resume: the checkpoint's
        pending prompts, granted or buffered before it but never trained)."""
        with self._lock:
            self._requeued.extend(sorted(indices))

    def actors(self) -> list[str]:
        with self._lock:
            return list(self._actors)

    # -- internals (lock held)
    def _verdict_locked(self, actor_id: str, index: int, grant_id: int) -> tuple[str, int]:
        live = self._live.get(index)
        if live is not None and live.grant_id == grant_id:
            return (ACCEPTED if live.actor_id == actor_id else WRONG_ACTOR), live.min_version
        return self._closed.get((index, grant_id), UNGRANTED), 0

    def _close_locked(self, index: int, reason: str) -> None:
        """End the live grant of `index`; a later delivery for it is refused as `reason`."""
        live = self._live.pop(index)
        work = self._actors.get(live.actor_id)
        if work is not None:
            work.outstanding.discard(index)
        self._closed[(index, live.grant_id)] = reason
        while len(self._closed) > CLOSED_MEMORY:
            self._closed.popitem(last=False)

    def _reissue_locked(self, indices: list[int]) -> None:
        self._reissue.extend(sorted(indices))
        self.reissued += len(indices)
        if self.sync:
            self._round_left += len(indices)

    def _withdraw_locked(self, work: _ActorWork) -> None:
        indices = sorted(work.outstanding)
        for index in indices:
            self._close_locked(index, LATE)
        self._reissue_locked(indices)
