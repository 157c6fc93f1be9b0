"""The learner's book of held-out evaluations: jobs out, results in.

Used by the learner process: the training loop requests evaluations and
records results (`LearnerEvaluations` in `learner/eval_loop.py`, held by
`rapid_async.learner.loop`);
the network thread hands jobs to actors and takes their answers (`EvalBoard`,
shared with `rapid_async.learner.network`). The learner
itself never evaluates and never waits for an evaluation while it trains
(DESIGN.md section 6: evaluation is work, not a pause).

A job asks for an evaluation of weights of version >= `min_version`:

- "start": the weights the run starts from, requested before training;
- "periodic": each `run.eval_every` versions, once that version is published;
- "final": the last version, requested at shut-down (the learner waits for
  it there, with a timeout, since the run summary needs it).

Who evaluates: a dedicated evaluator (an actor that asks for zero groups of
work, `rapid-actor --evaluator`) when one is connected, else the next actor
that asks for work. The network thread decides when in the actor's turn a job
goes out (before generation work in rapid-async, after the round's work in
the synchronous modes). The actor evaluates the weights it holds, which may be
newer than `min_version`; the result names the version it evaluated, so
metrics and plots put each result at its true version.

An actor that goes silent (no message for `timeout_s`) or leaves loses its job
to the next actor that asks; a late answer to a finished job is ignored. A
result binds to its job: only an actor that took the job may answer it (the
network thread has checked that the actor id is the sender's own), and only
with a version in [min_version, the newest published]; others are refused
and counted. The actor's metric names are whitelisted (`METRIC_KEYS`, pass@k)
and cannot overwrite the record's own fields. A
periodic job that no actor has taken yet is superseded by a newer one (its
result would be at the newer version anyway). Thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("rapid.learner")


@dataclass
class EvalJob:
    """One requested evaluation and where it stands.

    Attributes:
        job_id: unique within the run.
        kind: "start", "periodic" or "final".
        min_version: evaluate weights of at least this version.
        requested_at: wall time of the request.
        actor_id: the actor working on it (None: waiting for one).
        heard_at: monotonic time the actor was last heard from.
        attempts: how many actors have taken it.
        result: the EvalResult once answered.
    """

    job_id: int
    kind: str
    min_version: int
    requested_at: float
    actor_id: str | None = None
    heard_at: float = 0.0
    attempts: int = 0
    result: Any = None
    superseded: bool = False
    history: list[str] = field(default_factory=list)
    takers: set[str] = field(default_factory=set)
    """Every actor that has taken the job (one of them may answer)."""


class EvalBoard:
    """Evaluation jobs between the training loop and the network thread.

    Args:
        settings: the EvalTask fields every job shares (problems, samples,
            temperature, max_new_tokens, seed).
        timeout_s: seconds of silence after which a job goes to another actor.
    """

    def __init__(self, settings: dict[str, Any], timeout_s: float = 30.0):
        self.settings = dict(settings)
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._jobs: dict[int, EvalJob] = {}
        self._open: list[int] = []  # unfinished job ids, oldest first
        self._done: list[EvalJob] = []  # answered, not yet recorded
        self._evaluators: dict[str, float] = {}  # dedicated evaluator -> last heard
        self._next_id = 0
        self.counters = {"reissued": 0, "superseded": 0, "late_results": 0, "failed": 0,
                         "refused_actor": 0, "refused_version": 0}

    # -- called by the training loop
    def request(self, min_version: int, kind: str) -> EvalJob:
        """Ask for an evaluation at version >= min_version; returns the job."""
        with self._lock:
            for job_id in list(self._open):
                job = self._jobs[job_id]
                if job.kind == "periodic" and job.actor_id is None:
                    self._open.remove(job_id)
                    job.superseded = True
                    self.counters["superseded"] += 1
            job = EvalJob(self._next_id, kind, min_version, time.time())
            self._next_id += 1
            self._jobs[job.job_id] = job
            self._open.append(job.job_id)
            return job

    def find(self, min_version: int) -> EvalJob | None:
        """An unfinished or answered job that evaluates exactly `min_version` or later."""
        with self._lock:
            for job in self._jobs.values():
                if job.min_version == min_version and not job.superseded:
                    return job
            return None

    def take_results(self) -> list[EvalJob]:
        """Jobs answered since the last call, in order of arrival."""
        with self._lock:
            done, self._done = self._done, []
            return done

    def oldest_open_version(self) -> int | None:
        """The smallest min_version of the unfinished jobs (None: none open)."""
        with self._lock:
            return min((self._jobs[j].min_version for j in self._open), default=None)

    def status(self, job: EvalJob) -> str:
        """"answered", "running" (an actor has it) or "waiting" (no actor yet)."""
        with self._lock:
            if job.result is not None:
                return "answered"
            return "running" if job.actor_id is not None else "waiting"

    # -- called by the network thread
    def heard(self, actor_id: str, evaluator: bool = False) -> None:
        """Any message from `actor_id` shows it is alive."""
        now = time.monotonic()
        with self._lock:
            if evaluator:
                self._evaluators[actor_id] = now
            elif actor_id in self._evaluators:
                self._evaluators[actor_id] = now
            for job_id in self._open:
                job = self._jobs[job_id]
                if job.actor_id == actor_id:
                    job.heard_at = now

    def take(self, actor_id: str, evaluator: bool) -> tuple[EvalJob, dict] | None:
        """The next job for `actor_id` and its task fields, or None.

        Generating actors get no job while a dedicated evaluator is alive.
        """
        now = time.monotonic()
        with self._lock:
            if evaluator:
                self._evaluators[actor_id] = now
            alive = [a for a, t in self._evaluators.items() if now - t <= self.timeout_s]
            if alive and not evaluator:
                return None
            for job_id in self._open:
                job = self._jobs[job_id]
                if job.actor_id is None:
                    job.actor_id, job.heard_at = actor_id, now
                    job.attempts += 1
                    job.takers.add(actor_id)
                    job.history.append(f"taken by {actor_id}")
                    return job, {"job_id": job.job_id, "kind": job.kind,
                                 "min_version": job.min_version, **self.settings}
            return None

    def answer(self, result: Any, newest_version: int | None = None) -> bool:
        """Record an EvalResult; False if its job is unknown or already
        answered, or the result is refused: from an actor that never took the
        job, or of a version outside [min_version, `newest_version`] (the
        newest published; None: no upper bound)."""
        with self._lock:
            job = self._jobs.get(result.job_id)
            if job is None or job.result is not None or job.job_id not in self._open:
                self.counters["late_results"] += 1
                return False
            refusal = self._refusal(job, result, newest_version)
            if refusal is not None:
                self.counters[refusal[0]] += 1
                job.history.append(f"refused from {result.actor_id[:40]}: {refusal[1]}")
                log.warning("evaluation result for job %d refused: %s", job.job_id, refusal[1])
                if refusal[0] == "refused_version" and job.actor_id == result.actor_id:
                    # Its actor is done with it (e.g. it evaluated weights of
                    # a learner before a restart): the job goes out again.
                    self._release(result.actor_id, "its result was refused")
                return False
            job.result = result
            if result.error:
                self.counters["failed"] += 1
            self._open.remove(job.job_id)
            self._done.append(job)
            return True

    @staticmethod
    def _refusal(job: EvalJob, result: Any, newest: int | None) -> tuple[str, str] | None:
        """(counter, reason) if `result` may not answer `job`, else None."""
        if result.actor_id not in job.takers:
            return "refused_actor", (f"actor {result.actor_id[:40]!r} never took job {job.job_id} "
                                     f"(taken by {', '.join(sorted(job.takers)) or 'nobody'})")
        version = result.policy_version
        if version < job.min_version or (newest is not None and version > newest):
            return "refused_version", (f"version {version} is outside [{job.min_version}, "
                                       f"{newest if newest is not None else 'any'}] (the job's "
                                       "version and the newest published)")
        return None

    def release(self, actor_id: str, reason: str) -> list[int]:
        """Hand the jobs of `actor_id` (silent or gone) to the next actor; return their ids."""
        with self._lock:
            self._evaluators.pop(actor_id, None)
            return self._release(actor_id, reason)

    def _release(self, actor_id: str, reason: str) -> list[int]:
        freed = []
        for job_id in self._open:
            job = self._jobs[job_id]
            if job.actor_id == actor_id:
                job.actor_id = None
                job.history.append(f"released: {reason}")
                self.counters["reissued"] += 1
                freed.append(job_id)
        return freed

    def expire_silent(self) -> list[str]:
        """Release the jobs of actors silent for `timeout_s`; return those actors."""
        now = time.monotonic()
        with self._lock:
            silent = {self._jobs[j].actor_id for j in self._open
                      if self._jobs[j].actor_id is not None
                      and now - self._jobs[j].heard_at > self.timeout_s}
            for actor_id in silent:
                self._release(actor_id, f"silent for {self.timeout_s:.0f} s")
            return sorted(silent)


# The training loop's side lives in learner/eval_loop.py; these names stay importable here.
from rapid_async.learner.eval_loop import (METRIC_KEYS, NO_ACTOR_GRACE_S,  # noqa: E402,F401
                                           LearnerEvaluations, describe, metric_allowed,
                                           result_record, task_settings)
