"""`retry`: any task as a multi-turn episode with "wrong, try again" feedback.

The model answers the task's prompt; the task's verifier scores the answer.
A correct answer (reward >= the task's success threshold) ends the episode;
otherwise the environment answers with the feedback message and the model
tries again, until `env.max_turns`. The episode's reward is the reward of the
final answer. With the tiny character-level model, whose vocabulary has no
letters, use `feedback = "{prompt}"` (the problem asked again).

Options: `feedback` (a str; "{prompt}" is replaced by the problem's prompt),
`system_prompt`.
"""

from __future__ import annotations

from typing import Any

from rapid_async.envs.base import Environment, StepResult

DEFAULT_FEEDBACK = "Wrong, try again."


class RetryEnv(Environment):
    """Score each answer with the task; feedback and another turn while wrong."""

    name = "retry"

    def __init__(self, task: Any, feedback: str = DEFAULT_FEEDBACK, system_prompt: str = ""):
        super().__init__(task, system_prompt)
        if not isinstance(feedback, str) or not feedback:
            raise ValueError(f"feedback must be a non-empty string, got {feedback!r}")
        self.feedback = feedback
        self.threshold = float(getattr(task, "success_threshold", 1.0))

    def step(self, model_turn: str) -> StepResult:
        self.turn += 1
        reward = float(self.task.reward(self.problem, model_turn))
        if reward >= self.threshold:
            return StepResult([], reward, True, {"solved_turn": self.turn})
        text = self.feedback.replace("{prompt}", self.problem.prompt)
        return StepResult([{"role": "user", "content": text}], reward, False)
