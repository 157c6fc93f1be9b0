"""Task interface and registry: problems with checkable answers and their rewards.

A task hands out training problems by integer index (deterministic, so that the
actor can record its data position and a restarted run resumes exactly), a
fixed held-out set disjoint from training, and a verifier that scores a
completion's text with a reward in [0, 1].

Used by: the actor process (train problems, rewards), the evaluation helpers
and the warm start of the tiny model (held-out problems).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Problem:
    """One problem.

    Attributes:
        prompt_id: stable identifier of the problem within its task.
        prompt: the text given to the model.
        answer: the reference answer the verifier checks against.
    """

    prompt_id: str
    prompt: str
    answer: str


class Task(Protocol):
    """What the actor and evaluation need from a task."""

    name: str

    def train_problem(self, index: int) -> Problem:
        """The training problem at position `index` (>= 0), deterministic."""
        ...

    def heldout(self, n: int) -> list[Problem]:
        """The first `n` problems of the fixed held-out set (never in training)."""
        ...

    def reward(self, problem: Problem, completion_text: str | None) -> float:
        """Score a completion: a float in [0, 1]; never raises on bad text."""
        ...


_FACTORIES: dict[str, Callable[..., Task]] = {}
_BUILTIN: dict[str, str] = {
    "arithmetic": "rapid_async.tasks.arithmetic:ArithmeticTask",
    "hashbit": "rapid_async.tasks.hashbit:HashBitTask",  # benchmark-only (bin/gpu-check)
}
"""Built-in tasks, imported on first use: name -> "module:attribute"."""


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Make a task available to `get_task` under `name`.

    Args:
        name: registry key, e.g. "arithmetic".
        factory: called with the task options, returns the task.
    """
    if name in _FACTORIES and _FACTORIES[name] is not factory:
        raise ValueError(f"task {name!r} is already registered to {_FACTORIES[name]!r}")
    _FACTORIES[name] = factory


def known_tasks() -> list[str]:
    """Names `get_task` accepts, sorted."""
    return sorted(set(_FACTORIES) | set(_BUILTIN))


def get_task(name: str, **options) -> Task:
    """Build the task registered under `name`.

    Args:
        name: a task name, see `known_tasks()`.
        **options: passed to the task's constructor (e.g. digits=2, ops="+-").

    Returns:
        The task.

    Raises:
        ValueError: unknown name (the message lists the known ones), or
            options the task rejects.
    """
    factory = _FACTORIES.get(name)
    if factory is None and name in _BUILTIN:
        module_name, attribute = _BUILTIN[name].split(":")
        factory = getattr(importlib.import_module(module_name), attribute)
        _FACTORIES[name] = factory
    if factory is None:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(known_tasks())}")
    try:
        return factory(**options)
    except TypeError as err:
        raise ValueError(f"bad options {sorted(options)} for task {name!r}: {err}") from err
