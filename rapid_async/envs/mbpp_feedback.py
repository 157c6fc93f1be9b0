"""`mbpp-feedback`: MBPP where the model sees its failing test and may retry.

Each model turn is a program (the last ```python block, as the mbpp task
reads it). It is scored with the mbpp task's own reward (every hidden test
in the sandbox, `MBPPTask.reward`). A program that passes ends the episode
with reward 1. Otherwise the environment runs the program against the test
shown in the prompt, in the sandbox (`tasks.sandbox.Sandbox.run`), and
answers with what went wrong (the assertion or error output, or "the
visible test passes but hidden tests fail"); the model tries again until
`env.max_turns`. The reward is that of the final program.

Options: `system_prompt`, `timeout_s` (per feedback run, 10), `max_chars`
(feedback length, 1500), `isolation` (sandbox mode).
"""

from __future__ import annotations

import re
from typing import Any

from rapid_async.envs.base import Environment, StepResult
from rapid_async.envs.tools import shared_sandbox

_ASSERT = re.compile(r"^\s*assert .*$", re.M)


def visible_tests(prompt: str) -> list[str]:
    """The assert lines shown to the model in an mbpp prompt."""
    return [m.group(0).strip() for m in _ASSERT.finditer(prompt)]


class MBPPFeedbackEnv(Environment):
    """MBPP with test feedback (see the module docstring)."""

    name = "mbpp-feedback"

    def __init__(self, task: Any, system_prompt: str = "", timeout_s: float = 10.0,
                 max_chars: int = 1500, isolation: str = "auto"):
        super().__init__(task, system_prompt)
        if not callable(getattr(task, "reward", None)):
            raise ValueError("mbpp-feedback needs the mbpp task (task.name = \"mbpp\")")
        self.sandbox = shared_sandbox(timeout_s=timeout_s, isolation=isolation)
        self.max_chars = max_chars

    def _code(self, text: str) -> str:
        from rapid_async.tasks.mbpp import extract_code

        return extract_code(text, self.problem.meta.get("entry_point", ""))

    def feedback(self, text: str) -> str:
        """What the model is told about a failing program."""
        code = self._code(text)
        if not code.strip():
            return "No program found. Write the complete function in a ```python code block."
        tests = visible_tests(self.problem.prompt)
        result = self.sandbox.run(code + "\n\n" + "\n".join(tests) + "\n")
        if result.timed_out:
            detail = "The program ran out of time on the test."
        elif result.returncode:
            detail = "The test fails:\n" + (result.stderr.strip() or "(no error output)")
        else:
            detail = "The test shown passes, but other tests fail."
        if len(detail) > self.max_chars:
            detail = "..." + detail[-self.max_chars:]
        return detail + "\nFix the program and write the complete function again in a " \
                        "```python code block."

    def step(self, model_turn: str) -> StepResult:
        self.turn += 1
        reward = float(self.task.reward(self.problem, model_turn))
        if reward >= 1.0:
            return StepResult([], reward, True, {"solved_turn": self.turn})
        return StepResult([{"role": "user", "content": self.feedback(model_turn)}], reward, False)
