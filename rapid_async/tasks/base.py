"""Task interface and plug-in loading: problems with checkable answers and their rewards.

A task hands out training problems by integer index (deterministic, so that the
actor can record its data position and a restarted run resumes exactly), a
fixed held-out set disjoint from training, and a verifier that scores a
completion's text with a finite float reward (most tasks give 0 or 1; a task
may give e.g. -1 for a format error). A verifier should never raise; if it does
anyway, or returns something that is not a finite number, `score` counts it,
logs it with the prompt id and gives the run's failure value instead
(`rapid_async.tasks.scoring`).

Where a task comes from (`get_task(name, options)`), in this order:
1. a name registered in this process with `register_task`;
2. a built-in name (`known_tasks()`: arithmetic, gsm8k, math, mbpp, minif2f);
3. a Python entry point in the group `rapid_async.tasks` (a package declares
   `[project.entry-points."rapid_async.tasks"] mytask = "mypkg.tasks:MyTask"`);
4. a "package.module:Class" path (importable on the child's sys.path: the
   launcher starts its children in the current directory, so a module there
   or on PYTHONPATH works).
Ways 2-4 reach the learner and actor processes that `rapid-run` starts,
because every process resolves the name itself from the run config.

The task's constructor receives the `[task.options]` table as keyword
arguments and must reject options it does not know with a ValueError (a
TypeError from an unexpected keyword is turned into one).

Used by: the learner and actor processes, evaluation (rapid-eval, held-out
evaluation) and the warm start of the tiny model.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

ENTRY_POINT_GROUP = "rapid_async.tasks"


@dataclass(frozen=True)
class Problem:
    """One problem.

    Attributes:
        prompt_id: stable identifier of the problem within its task.
        prompt: the text given to the model (the user message in chat format).
        answer: the reference answer the verifier checks against.
        meta: task-specific data the verifier needs (tests, a Lean header...).
    """

    prompt_id: str
    prompt: str
    answer: str
    meta: dict = field(default_factory=dict, compare=False)


class Task(Protocol):
    """What the actor, the learner and evaluation need from a task.

    Optional attributes a task may define:
        stop_strings: list[str], extra stop strings for generation (the run's
            `task.stop` adds to them).
        system_prompt: str, the default system message in chat format (the
            run's `task.system_prompt` replaces it when set).
        score_batch(problems, texts) -> list[float]: score many completions at
            once (e.g. in parallel); the default scores them one by one.
        close(): release resources (worker processes).
    """

    name: str

    def train_problem(self, index: int) -> Problem:
        """The training problem at position `index` (>= 0), deterministic."""
        ...

    def heldout(self, n: int) -> list[Problem]:
        """The first `n` problems of the fixed held-out set (never in training)."""
        ...

    def reward(self, problem: Problem, completion_text: str | None) -> float:
        """Score a completion: a finite float; should never raise on bad text."""
        ...


_FACTORIES: dict[str, Callable[..., Task]] = {}
_BUILTIN: dict[str, str] = {
    "arithmetic": "rapid_async.tasks.arithmetic:ArithmeticTask",
    "gsm8k": "rapid_async.tasks.gsm8k:GSM8KTask",
    "math": "rapid_async.tasks.math:MathTask",
    "mbpp": "rapid_async.tasks.mbpp:MBPPTask",
    "minif2f": "rapid_async.tasks.minif2f:MiniF2FTask",
    "hashbit": "rapid_async.tasks.hashbit:HashBitTask",  # benchmark-only (bin/gpu-check)
    "reasoning_gym": "rapid_async.envs.adapters:ReasoningGymTask",  # needs .[envs]
}
"""Built-in tasks, imported on first use: name -> "module:attribute"."""
_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Make a task available to `get_task` under `name` in this process only.

    Child processes started by `rapid-run` do not see it: use an entry point
    or a "module:Class" name for those.

    Args:
        name: registry key, e.g. "arithmetic".
        factory: called with the task options, returns the task.
    """
    if name in _FACTORIES and _FACTORIES[name] is not factory:
        raise ValueError(f"task {name!r} is already registered to {_FACTORIES[name]!r}")
    _FACTORIES[name] = factory


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """Installed entry points of the group `rapid_async.tasks`, by name."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def known_tasks() -> list[str]:
    """Names `get_task` accepts without a module path, sorted."""
    return sorted(set(_FACTORIES) | set(_BUILTIN) | set(_entry_points()))


def _import(path: str, what: str) -> Callable[..., Task]:
    """Import "module:attribute"; ValueError naming `what` when it fails."""
    module_name, attribute = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what}: cannot import module {module_name!r} ({err}); is it on "
                         "PYTHONPATH (or installed) for every process of the run?") from err
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"{what}: module {module_name!r} has no attribute {attribute!r}") from None


def find_task_factory(name: str) -> Callable[..., Task]:
    """The constructor of the task called `name` (see the module docstring).

    Raises:
        ValueError: naming the task and the known names.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"task.name must be a non-empty string, got {name!r}")
    if name in _FACTORIES:
        return _FACTORIES[name]
    if name in _BUILTIN:
        factory = _import(_BUILTIN[name], f"built-in task {name!r}")
    elif name in (eps := _entry_points()):
        try:
            factory = eps[name].load()
        except Exception as err:  # a broken plug-in package: say which one
            raise ValueError(f"task {name!r}: loading entry point {eps[name].value!r} of "
                             f"group {ENTRY_POINT_GROUP!r} failed: {err}") from err
    elif _PATH.match(name):
        factory = _import(name, f"task {name!r}")
    else:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(known_tasks())}, "
                         "or give a 'package.module:Class' path")
    if not callable(factory):
        raise ValueError(f"task {name!r} resolved to {factory!r}, which is not callable")
    _FACTORIES[name] = factory
    return factory


def get_task(name: str, options: dict[str, Any] | None = None, **kwargs: Any) -> Task:
    """Build the task called `name` with its options.

    Args:
        name: a task name (`known_tasks()`), an entry point name or "module:Class".
        options: the `[task.options]` table, passed as keyword arguments.
        **kwargs: more options (merged over `options`).

    Returns:
        The task.

    Raises:
        ValueError: unknown name, or options the task rejects (the message
            names the task and the options).
    """
    factory = find_task_factory(name)
    merged = {**(options or {}), **kwargs}
    try:
        task = factory(**merged)
    except TypeError as err:
        raise ValueError(f"task {name!r}: bad options {sorted(merged)}: {err}") from err
    except ValueError as err:
        raise ValueError(f"task {name!r}: {err}") from err
    for method in ("train_problem", "heldout", "reward"):
        if not callable(getattr(task, method, None)):
            raise ValueError(f"task {name!r} has no {method}() method; see rapid_async.tasks.base.Task")
    return task


def task_from_config(cfg: Any) -> Task:
    """Build the task of a run config (`cfg.task.name` with `cfg.task.options`)."""
    return get_task(cfg.task.name, dict(cfg.task.options))
