"""Environments: multi-turn episodes and tools (see `envs/base.py`).

base.py      Environment, StepResult, SingleTurnEnv, loading by name
render.py    messages -> token ids (the opening; env turns as a suffix)
runner.py    EpisodeRunner: many episodes at once, batched model turns
rollout.py   episodes -> RolloutGroups (loss masks), the learner's prompt check
tools.py     <tool_call> parsing, the sandboxed Python tool
retry.py, python_math.py, mbpp_feedback.py   built-in environments
adapters.py  reasoning-gym procedural datasets as a task
"""

from rapid_async.envs.base import (Environment, SingleTurnEnv, StepResult, env_factory,
                                   find_env_class, known_envs)
from rapid_async.envs.runner import Episode, EpisodeLimits, EpisodeRunner

__all__ = ["Environment", "Episode", "EpisodeLimits", "EpisodeRunner", "SingleTurnEnv",
           "StepResult", "env_factory", "find_env_class", "known_envs"]
