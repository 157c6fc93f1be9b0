"""The environment interface: a problem becomes a multi-turn episode.

An environment is what the model talks to during a rollout. It is built from
the run's task (which still hands out problems by index and owns the
held-out set) and runs one episode at a time, gym style:

    env = factory()                     # one instance per live episode
    messages = env.reset(problem)       # the opening chat messages
    step = env.step(model_turn_text)    # -> StepResult(messages, reward, done)
    ... until step.done, the turn limit or the token limit

`reset` returns the conversation's opening messages ({"role", "content"}
dicts: system and user, as a chat template takes them); it must be a pure
function of the problem (the learner checks arriving prompts against it).
`step` gets the text of the model's latest turn and returns the messages the
environment answers with (user feedback, tool results: role "user" or
"tool"), the reward the episode gets if it ends here, and whether it is done.
So an episode cut by the turn or token limit is scored with the reward of its
last step. Rewards must be finite floats; a step that raises ends its episode
with `task.failure_reward` (counted, logged), never the actor.

An environment may define `tools` (JSON schemas, passed to the chat template
as `tools=`) and `stop_strings` (extra stop strings for model turns, e.g.
"</tool_call>").

The single-turn case (`SingleTurnEnv`) is today's task: reset gives the
problem as the user message, the first step scores the completion with the
task's verifier and ends the episode. Runs without `[env]` do not build
environments at all (`actor/rollout.py` keeps its one-call path).

Where an environment comes from (`env_factory(cfg, task)`): a built-in name
(`known_envs()`), a Python entry point in the group `rapid_async.envs`, or a
"package.module:Class" path. The class is called as `Class(task, **options)`
(`[env.options]`), once per concurrent episode; share expensive resources
(a sandbox, a dataset) through the task or a module-level cache.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rapid_async.tasks.base import Problem

ENTRY_POINT_GROUP = "rapid_async.envs"
_BUILTIN = {
    "single": "rapid_async.envs.base:SingleTurnEnv",
    "retry": "rapid_async.envs.retry:RetryEnv",
    "python-math": "rapid_async.envs.python_math:PythonMathEnv",
    "mbpp-feedback": "rapid_async.envs.mbpp_feedback:MBPPFeedbackEnv",
}
"""Built-in environments, imported on first use: name -> "module:Class"."""


@dataclass
class StepResult:
    """What the environment answers a model turn with.

    Attributes:
        messages: the environment's new messages (role "user" or "tool"),
            empty when done.
        reward: the episode's reward if it ends after this step (finite).
        done: the episode is over (the answer is final).
        info: small flat dict of str -> number for metrics (e.g. tool calls).
    """

    messages: list[dict[str, Any]] = field(default_factory=list)
    reward: float = 0.0
    done: bool = False
    info: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.reward, bool) or not isinstance(self.reward, (int, float)) \
                or not math.isfinite(self.reward):
            raise ValueError(f"StepResult.reward must be a finite number, got {self.reward!r}")
        for m in self.messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) \
                    or m.get("role") not in ("user", "tool", "system"):
                raise ValueError(f"environment message {m!r:.120} must be a dict with role "
                                 "user / tool / system and str content")


class Environment:
    """Base class of environments (see the module docstring).

    Args:
        task: the run's task (problems, verifier).
        system_prompt: system message of the episode ("" none); the run's
            prompt settings pass theirs in.
    """

    name = "environment"
    tools: list[dict] | None = None
    stop_strings: tuple[str, ...] = ()

    def __init__(self, task: Any, system_prompt: str = ""):
        self.task = task
        self.system_prompt = system_prompt
        self.problem: Problem | None = None
        self.turn = 0

    def opening(self, problem: Problem) -> list[dict[str, Any]]:
        """[system,] user(problem.prompt): the usual opening."""
        messages = [{"role": "user", "content": problem.prompt}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def reset(self, problem: Problem) -> list[dict[str, Any]]:
        """Start an episode on `problem`; returns the opening messages."""
        self.problem, self.turn = problem, 0
        return self.opening(problem)

    def step(self, model_turn: str) -> StepResult:
        """Answer the model's latest turn (text, special tokens dropped)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what this instance holds (default: nothing)."""


class SingleTurnEnv(Environment):
    """Today's task as a one-turn episode: the first answer is scored and final.

    Args:
        task: the task; its verifier (`reward`) scores the answer.
    """

    name = "single"

    def step(self, model_turn: str) -> StepResult:
        return StepResult([], float(self.task.reward(self.problem, model_turn)), True)


# ---------------------------------------------------------------- loading


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def known_envs() -> list[str]:
    """Names `find_env_class` accepts without a module path, sorted."""
    return sorted(set(_BUILTIN) | set(_entry_points()))


def find_env_class(name: str) -> Callable[..., Environment]:
    """The environment class called `name`.

    Raises:
        ValueError: naming the environment and the known names.
    """
    if name in _BUILTIN:
        path = _BUILTIN[name]
    elif name in (eps := _entry_points()):
        return eps[name].load()
    elif ":" in name:
        path = name
    else:
        raise ValueError(f"unknown environment {name!r}; known: {', '.join(known_envs())}, "
                         "or give a 'package.module:Class' path")
    module, attribute = path.split(":", 1)
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"environment {name!r}: cannot load {path!r} ({err})") from err


def env_factory(cfg: Any, task: Any) -> Callable[[], Environment] | None:
    """A maker of environment instances for a run config, or None without `[env]`.

    The run's system prompt (`task.system_prompt`, else the task's own) is
    passed to every instance unless `[env.options]` gives `system_prompt`.

    Raises:
        ValueError: unknown name, or options the environment rejects.
    """
    if not cfg.env.name:
        return None
    cls = find_env_class(cfg.env.name)
    options = dict(cfg.env.options)
    options.setdefault("system_prompt", cfg.task.system_prompt
                       or getattr(task, "system_prompt", "") or "")

    def make() -> Environment:
        try:
            return cls(task, **options)
        except TypeError as err:
            raise ValueError(f"environment {cfg.env.name!r}: bad options {sorted(options)}: "
                             f"{err}") from err

    make()  # fail now, naming the options, not in the middle of a rollout
    return make
