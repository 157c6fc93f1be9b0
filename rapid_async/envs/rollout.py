"""Episodes -> rollout groups for the learner, and the prompt the learner expects.

Used by the actor (`actor/rollout.generate_groups` when the run has an
`[env]`) and by the learner's check of arriving groups
(`episode_prompt_tokens`). A group holds the K episodes of one problem:
`completion_ids` are every token after the opening (model and env turns, in
order, exactly the ids the engine sampled and the renderer appended),
`logprobs` the behaviour log-probs of the model's tokens (0 on env tokens)
and `loss_mask` 1 on the model's tokens. A group whose episodes hold only
model tokens (one-turn episodes) is sent without a loss mask, exactly as
without environments.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from rapid_async.engines.base import Completion
from rapid_async.envs.runner import Episode, EpisodeRunner
from rapid_async.wire.protocol import RolloutGroup


class EpisodePrompts:
    """Training index -> the opening token ids an actor's episode starts with.

    The learner's group check uses it (one environment instance, reused).

    Args:
        factory: makes the run's environment; task: the run's task;
        tokenizer, settings: the model's tokenizer and the run's prompt settings.
    """

    def __init__(self, factory: Any, task: Any, tokenizer: Any, settings: Any):
        from rapid_async.envs.render import Renderer

        self.env, self.task = factory(), task
        self.renderer = Renderer(tokenizer, settings, getattr(self.env, "tools", None))

    def __call__(self, index: int) -> list[int]:
        return self.renderer.opening(self.env.reset(self.task.train_problem(index)))


def pack_episodes(actor_id: str, prompt_id: str, version: int, episodes: list[Episode],
                  gen_seconds: float, grant_id: int = 0) -> RolloutGroup:
    """The K episodes of one problem as one RolloutGroup (see the module docstring)."""
    from rapid_async.actor.rollout import pack_group

    comps = [Completion(ep.ids, ep.logprobs, ep.finish_reason) for ep in episodes]
    group = pack_group(actor_id, prompt_id, version, episodes[0].prompt, comps,
                       [ep.reward for ep in episodes], gen_seconds, grant_id=grant_id)
    if any(0 in ep.mask for ep in episodes):
        mask = torch.zeros(group.completion_ids.shape, dtype=torch.int32)
        for i, ep in enumerate(episodes):
            mask[i, :len(ep.mask)] = torch.tensor(ep.mask, dtype=torch.int32)
        group.loss_mask = mask
    k = len(episodes)
    group.info["env_turns"] = sum(ep.turns for ep in episodes) / k
    group.info["env_tokens"] = sum(len(ep.ids) - ep.model_tokens for ep in episodes)
    for key in sorted({key for ep in episodes for key in ep.info})[:16]:
        group.info[f"env_{key}"] = sum(ep.info.get(key, 0.0) for ep in episodes)
    return group


def episode_groups(runner: EpisodeRunner, task: Any, indices: list[int], k: int,
                   temperature: float, version: int, actor_id: str,
                   grant_id: int = 0) -> list[RolloutGroup]:
    """Play K episodes of each granted training problem and pack one group each."""
    problems = [task.train_problem(i) for i in indices]
    t0 = time.perf_counter()
    played = runner.run(problems, k, temperature)
    gen_s = (time.perf_counter() - t0) / max(len(indices), 1)
    return [pack_episodes(actor_id, str(index), version, episodes, gen_s, grant_id)
            for index, episodes in zip(indices, played)]
