"""The training loop's side of held-out evaluations: when to ask, what to record.

Used by the learner's training loop (`rapid_async.learner.loop` holds a
`LearnerEvaluations`); the job board it shares with the network thread,
`EvalBoard`, and the rules of who evaluates what are in
`learner/evaluation.py`. Here: the metrics record of an answered job
(`result_record`, with the whitelist of the actor's metric names), the
EvalTask settings a run shares, and the final evaluation's wait at shut-down.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rapid_async.learner.evaluation import EvalBoard, EvalJob

log = logging.getLogger("rapid.learner")


def result_record(job: EvalJob, version_clock: dict[int, dict[str, float]],
                  current_version: int) -> dict[str, Any]:
    """The metrics record of an answered job.

    Args:
        job: an answered job (`job.result` is its EvalResult).
        version_clock: version -> {"time", "elapsed_s", "train_s"} of the
            moment the learner made that version.
        current_version: the learner's version as the result is recorded.

    Returns:
        {"event": "eval", "eval/version": the version evaluated,
         "eval/success", "eval/pass@k", ... (the actor's summary),
         "eval/time", "eval/elapsed_s", "eval/train_s": when that version was
         made (plots place the result there), "eval/lag_s": how long after
         that the result arrived, and who evaluated it}.
    """
    result = job.result
    rec: dict[str, Any] = {}
    if not result.error:  # the actor's numbers first: the record's own fields win
        rec.update({f"eval/{key}": value for key, value in result.metrics.items()
                    if metric_allowed(key)})
        dropped = sorted(k for k in result.metrics if not metric_allowed(k))
        if dropped:
            rec["eval/dropped_metrics"] = len(dropped)
            log.warning("evaluation result for job %d: metric names not recorded: %s",
                        job.job_id, ", ".join(k[:40] for k in dropped[:10]))
    rec.update({
        "event": "eval", "version": current_version, "eval/kind": job.kind,
        "eval/version": result.policy_version, "eval/requested_version": job.min_version,
        "eval/actor": result.actor_id, "eval/attempts": job.attempts,
    })
    if result.error:
        rec["eval/error"] = result.error
    made = version_clock.get(result.policy_version)
    if made is not None:
        rec.update({"eval/time": made["time"], "eval/elapsed_s": made["elapsed_s"],
                    "eval/train_s": made["train_s"], "eval/lag_s": time.time() - made["time"]})
    return rec


METRIC_KEYS = frozenset({"success", "mean_reward", "sample_reward", "problems", "samples",
                         "seconds", "verifier_failures"})
"""The evaluation summary's names (rapid_async.evaluate) a result may carry, besides pass@k."""
_PASS_AT = re.compile(r"pass@[1-9][0-9]{0,5}")


def metric_allowed(key: str) -> bool:
    """Whether an actor's metric name goes into the record (as eval/KEY)."""
    return key in METRIC_KEYS or _PASS_AT.fullmatch(key) is not None


def task_settings(cfg: Any) -> dict[str, Any]:
    """The EvalTask fields that every held-out evaluation of a run shares."""
    return {"problems": cfg.run.eval_size, "samples": cfg.run.eval_samples,
            "temperature": cfg.algo.temperature, "max_new_tokens": cfg.algo.max_new_tokens,
            "seed": cfg.run.seed}


def describe(rec: dict[str, Any]) -> str:
    """One line about an evaluation result record."""
    if rec.get("eval/error"):
        return (f"{rec.get('eval/kind')} evaluation of version {rec.get('eval/version')} "
                f"failed on {rec.get('eval/actor')}: {rec['eval/error']}")
    extra = " ".join(f"{k[5:]} {v:.3f}" for k, v in rec.items()
                     if k.startswith("eval/pass@") and isinstance(v, float))
    return (f"held-out success {rec.get('eval/success', float('nan')):.3f} at version "
            f"{rec.get('eval/version')} ({rec.get('eval/kind')}, by {rec.get('eval/actor')}, "
            f"{rec.get('eval/seconds', 0.0):.1f}s) {extra}").rstrip()


NO_ACTOR_GRACE_S = 2.0
"""At shut-down, how long to wait for an evaluation when no actor is connected."""


class LearnerEvaluations:
    """The training loop's side: when to ask, what to record, the final wait.

    Args:
        cfg: the run config (run.eval_every, run.eval_timeout_s).
        board: the EvalBoard shared with the network thread.
        metrics: the learner's MetricsWriter.
        start_version: the version training starts from.
    """

    def __init__(self, cfg: Any, board: EvalBoard, metrics: Any, start_version: int):
        self.cfg, self.board, self.metrics = cfg, board, metrics
        self.start_version = start_version
        self.every = cfg.run.eval_every
        self.next_eval = self._next(start_version)
        self.version_clock: dict[int, dict[str, float]] = {}  # version -> when it was made
        self.records: dict[int, dict[str, Any]] = {}  # job id -> its result record
        self.start_job: EvalJob | None = None
        self.t_start = time.time()

    def _next(self, version: int) -> int | None:
        return (version // self.every + 1) * self.every if self.every else None

    def start(self, t_start: float) -> None:
        """Ask for the evaluation of the starting weights."""
        self.t_start = t_start
        self.note_version(self.start_version, 0.0)
        self.start_job = self.board.request(self.start_version, "start")

    def note_version(self, version: int, eval_s: float) -> None:
        """Remember when `version` was made (`eval_s`: learner time spent on
        evaluation so far, not training), so that its result is placed there."""
        now = time.time()
        self.version_clock[version] = {"time": now, "elapsed_s": now - self.t_start,
                                       "train_s": now - self.t_start - eval_s}

    def after_step(self, published_version: int, version: int) -> None:
        """Ask for an evaluation once a version at or past the next `eval_every`
        boundary is published (actors can only evaluate what they were sent);
        record the results that arrived."""
        if self.next_eval is not None and published_version >= self.next_eval:
            self.board.request(published_version, "periodic")
            self.next_eval = self._next(published_version)
        self.record_arrived(version)

    def record_arrived(self, version: int) -> None:
        """Write a metrics record for every result that has arrived."""
        from rapid_async.metrics import clean

        for job in self.board.take_results():
            rec = clean(result_record(job, self.version_clock, version))
            self.metrics.write(rec)
            self.records[job.job_id] = rec
            print(f"[learner] {describe(rec)}", flush=True)
        oldest = self.board.oldest_open_version()
        keep_from = version if oldest is None else min(oldest, version)
        for v in [v for v in self.version_clock if v < keep_from]:
            del self.version_clock[v]

    def final_job(self, version: int) -> EvalJob:
        """The job that evaluates the last version (a periodic one may already)."""
        return self.board.find(version) or self.board.request(version, "final")

    def results(self, final_job: EvalJob) -> tuple[dict[str, Any], dict[str, Any]]:
        """The result records of the start and the final evaluation ({} if none)."""
        start = self.records.get(self.start_job.job_id, {}) if self.start_job else {}
        return start, self.records.get(final_job.job_id, {})

    def wait(self, final_job: EvalJob, version: int, check: Any, actors_connected: Any) -> float:
        """Shut-down only: wait for the final (and start) evaluation up to
        `run.eval_timeout_s`, or NO_ACTOR_GRACE_S when no actor is connected;
        write an "eval_missing" record for each that gets no answer.

        Args:
            final_job: from `final_job`.
            version: the learner's last version.
            check: re-raises a failure of the network thread.
            actors_connected: () -> whether any actor is connected.

        Returns:
            Seconds waited.
        """
        jobs = list({id(j): j for j in (self.start_job, final_job) if j is not None}.values())
        t0 = time.monotonic()
        if any(self.board.status(job) != "answered" for job in jobs):
            print(f"[learner] waiting for the final evaluation of version {version} "
                  f"(at most {self.cfg.run.eval_timeout_s:.0f} s)", flush=True)
        while True:
            check()
            self.record_arrived(version)
            states = [self.board.status(job) for job in jobs]
            if all(state == "answered" for state in states):
                break
            waited = time.monotonic() - t0
            alone = "running" not in states and not actors_connected()
            if waited > self.cfg.run.eval_timeout_s or (alone and waited > NO_ACTOR_GRACE_S):
                for job, state in zip(jobs, states):
                    if state != "answered":
                        self._record_missing(job, state, waited, alone)
                break
            time.sleep(0.05)
        return time.monotonic() - t0

    def _record_missing(self, job: EvalJob, state: str, waited: float, alone: bool) -> None:
        if alone:
            reason = "no actor is connected"
        elif state == "waiting":
            reason = f"no actor took it in {waited:.0f} s (run.eval_timeout_s)"
        else:
            reason = f"actor {job.actor_id} did not answer in {waited:.0f} s (run.eval_timeout_s)"
        msg = f"no {job.kind} evaluation of version {job.min_version}: {reason}"
        log.warning(msg)
        print(f"[learner] {msg}", flush=True)
        self.metrics.write({"event": "eval_missing", "eval/kind": job.kind,
                            "eval/requested_version": job.min_version, "reason": reason,
                            "elapsed_s": time.time() - self.t_start})
