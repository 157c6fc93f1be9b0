"""Scoring completions safely: a verifier that fails costs one reward, not the run.

Used by the actor process (`rapid_async.actor.rollout`) and by evaluation. A
task's verifier should never raise and should return a finite float. When it
raises anyway, returns NaN / inf, or returns something that is not a number,
`Scorer` logs it with the prompt id, counts it (`failures`, by kind) and
gives the configured failure value (`task.failure_reward`, default 0.0).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any

from rapid_async.tasks.base import Problem

log = logging.getLogger("rapid.tasks")


class Scorer:
    """Calls a task's verifier and turns every failure into `failure_reward`.

    Args:
        task: the task (its `reward`, and `score_batch` where it has one).
        failure_reward: the reward given when the verifier raises or returns a
            non-finite / non-numeric value.
    """

    def __init__(self, task: Any, failure_reward: float = 0.0):
        if not math.isfinite(failure_reward):
            raise ValueError(f"task.failure_reward = {failure_reward} must be finite")
        self.task = task
        self.failure_reward = float(failure_reward)
        self.failures: Counter[str] = Counter()

    def _check(self, problem: Problem, value: Any) -> float:
        """`value` as a finite float, or the failure value (counted, logged)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return self._fail(problem, "non_numeric", f"returned {type(value).__name__} {value!r:.80}")
        if not math.isfinite(value):
            return self._fail(problem, "non_finite", f"returned {value}")
        return float(value)

    def _fail(self, problem: Problem, kind: str, detail: str) -> float:
        self.failures[kind] += 1
        log.warning("verifier of task %s on prompt %s %s; scored %s", getattr(self.task, "name", "?"),
                    problem.prompt_id, detail, self.failure_reward)
        return self.failure_reward

    def score(self, problem: Problem, text: str | None) -> float:
        """Reward of one completion; never raises."""
        try:
            value = self.task.reward(problem, text)
        except Exception as exc:  # a verifier bug must not take the actor down
            return self._fail(problem, "exception", f"raised {type(exc).__name__}: {exc}")
        return self._check(problem, value)

    def score_many(self, problems: list[Problem], texts: list[str | None]) -> list[float]:
        """Rewards of many completions (problems[i] answered by texts[i]); never raises.

        Uses the task's `score_batch` when it has one (e.g. to run programs in
        parallel), falling back to one-by-one scoring if that fails as a whole.
        """
        batch = getattr(self.task, "score_batch", None)
        if batch is not None:
            try:
                values = list(batch(problems, texts))
                if len(values) != len(texts):
                    raise ValueError(f"score_batch returned {len(values)} rewards for {len(texts)}")
                return [self._check(p, v) for p, v in zip(problems, values)]
            except Exception as exc:
                self.failures["batch_exception"] += 1
                log.warning("score_batch of task %s raised %s: %s; scoring one by one",
                            getattr(self.task, "name", "?"), type(exc).__name__, exc)
        return [self.score(p, t) for p, t in zip(problems, texts)]
