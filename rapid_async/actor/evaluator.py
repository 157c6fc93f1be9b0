"""An actor's evaluation work: an EvalTask in, an EvalResult out.

Used by the actor process (`rapid_async.actor.loop`), by generating actors and
by dedicated evaluators (`rapid-actor --evaluator`) alike. The actor evaluates
the weights it holds, at least the task's `min_version` (it waits for them
first), through the one evaluation code path (`rapid_async.evaluate`), with
the prompt format and stop strings of its training prompts, writes
the per-problem records to RUN_DIR/evals/ and answers with the summary and the
version it evaluated. While it works it keeps telling the learner that it is
alive, so that a long evaluation is not mistaken for a dead actor.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from rapid_async.evaluate import EvalSettings, run_evaluation, write_records
from rapid_async.tasks.scoring import Scorer
from rapid_async.wire.protocol import EvalResult, EvalTask

log = logging.getLogger("rapid.actor")
HEARTBEAT_S = 2.0


def settings_for(task: EvalTask, cfg: Any) -> EvalSettings:
    """The EvalSettings of a task; engine calls are sized like the actor's
    training chunks (chunk_groups x group_size completions), which fit."""
    return EvalSettings(problems=task.problems, greedy=True, samples=task.samples,
                        temperature=task.temperature, max_new_tokens=task.max_new_tokens,
                        seed=task.seed,
                        rows_per_call=cfg.actor.chunk_groups * cfg.algo.group_size)


def records_path(run_dir: str, task: EvalTask, version: int, actor_id: str) -> Path:
    """RUN_DIR/evals/<kind>-v<version>-job<id>-<actor>.jsonl"""
    return (Path(run_dir) / "evals" /
            f"{task.kind}-v{version:08d}-job{task.job_id:04d}-{actor_id}.jsonl")


def evaluate_task(actor: Any, task: EvalTask) -> EvalResult | None:
    """Run one evaluation task with the actor's engine and current weights.

    Args:
        actor: the `Actor` (engine, tokenizer, task, cfg, sockets, version).
        task: what the learner asked for.

    Returns:
        The EvalResult to send (with `error` set if the evaluation failed), or
        None if the learner said stop while the actor waited for weights.
    """
    if not actor._wait_version(task.min_version):
        return None
    version = actor.version
    last_beat = [time.monotonic()]

    def heartbeat(done: int, total: int) -> None:
        if time.monotonic() - last_beat[0] > HEARTBEAT_S:
            actor.sockets.send_stats({"eval_job": task.job_id, "eval_done": done,
                                      "eval_total": total})
            last_beat[0] = time.monotonic()

    log.info("actor %s: %s evaluation (job %d) at version %d", actor.actor_id, task.kind,
             task.job_id, version)
    try:
        report = run_evaluation(actor.engine, actor.tokenizer, actor.task,
                                settings_for(task, actor.cfg), progress=heartbeat,
                                prompt_settings=actor.prompt_settings,
                                scorer=Scorer(actor.task, actor.cfg.task.failure_reward),
                                runner=getattr(actor, "runner", None))
    except Exception as exc:  # reported to the learner, which records the failure
        log.exception("actor %s: evaluation job %d failed", actor.actor_id, task.job_id)
        return EvalResult(actor.actor_id, task.job_id, version, {},
                          f"{type(exc).__name__}: {exc}"[:2000])
    try:
        write_records(records_path(actor.run_dir, task, version, actor.actor_id), report)
    except OSError as exc:  # the numbers still count; the records are a convenience
        log.warning("actor %s: could not write evaluation records: %s", actor.actor_id, exc)
    return EvalResult(actor.actor_id, task.job_id, version, dict(report.summary), "")
