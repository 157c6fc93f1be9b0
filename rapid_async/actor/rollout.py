"""Rollouts: prompts -> K sampled completions -> scored `RolloutGroup`s.

Used by the actor process (`rapid_async.actor.loop`). One call generates a
chunk of granted prompts in one engine request (prompts encoded by
`tasks.prompts.encode_prompt`, in the run's prompt format, with its stop
strings), scores every completion through `tasks.scoring.Scorer` (a failing
verifier costs one reward, never the actor) and packs each prompt's K
completions, behaviour log-probs, rewards and finish reasons into one group
for the learner.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from rapid_async.config import Config
from rapid_async.engines.base import Completion, GenerateRequest
from rapid_async.tasks.prompts import PromptSettings, decode_completion, encode_prompt
from rapid_async.tasks.scoring import Scorer
from rapid_async.wire.protocol import RolloutGroup


def prompt_tokens(task: Any, tokenizer: Any, index: int, settings: PromptSettings) -> list[int]:
    """The token ids of training prompt `index`, exactly as the actor sends
    them (the learner checks arriving groups against this)."""
    return encode_prompt(tokenizer, task.train_problem(index).prompt, settings)


def generate_groups(engine: Any, tokenizer: Any, task: Any, cfg: Config, indices: list[int],
                    version: int, actor_id: str, scorer: Scorer | None = None,
                    prompt_settings: PromptSettings | None = None,
                    grant_id: int = 0, runner: Any = None,
                    step_hook: Any = None) -> list[RolloutGroup]:
    """Generate and score the training prompts at `indices` with weights `version`.

    Args:
        engine, tokenizer, task, cfg: the actor's engine, tokenizer, task and run config.
        indices: training problem indices granted by the learner.
        version: the weight version the engine holds.
        actor_id: this actor's name.
        scorer: reuse one Scorer to keep its failure counts (default: a new one).
        prompt_settings: default `PromptSettings.from_config(cfg, task)`.
        grant_id: the WorkGrant the indices came from, echoed in every group.
        runner: an `envs.EpisodeRunner` when the run has an `[env]`: each
            completion is then a multi-turn episode (`envs/rollout.py`).
        step_hook: in-flight weight updates (`actor.inflight`, engines with
            `supports_step_hook`): called between decode steps, applies queued
            weights and returns the version held; each group then carries
            per-token versions and its oldest token's version.

    Returns:
        One group per index, in the same order.
    """
    if runner is not None:
        from rapid_async.envs.rollout import episode_groups

        return episode_groups(runner, task, indices, cfg.algo.group_size, cfg.algo.temperature,
                              version, actor_id, grant_id)
    scorer = scorer or Scorer(task, cfg.task.failure_reward)
    settings = prompt_settings or PromptSettings.from_config(cfg, task)
    if step_hook is not None and not getattr(engine, "supports_step_hook", False):
        # No weights mid-generation (vLLM): take them between sub-chunks instead.
        pieces = max(1, min(cfg.actor.inflight_subchunks, len(indices)))
        size = -(-len(indices) // pieces)
        return [g for start in range(0, len(indices), size)
                for g in generate_groups(engine, tokenizer, task, cfg,
                                         indices[start:start + size], step_hook(), actor_id,
                                         scorer, settings, grant_id)]
    problems = [task.train_problem(i) for i in indices]
    prompts = [prompt_tokens(task, tokenizer, i, settings) for i in indices]
    t0 = time.perf_counter()
    outs = engine.generate(GenerateRequest(
        prompts=prompts, n=cfg.algo.group_size, temperature=cfg.algo.temperature,
        max_new_tokens=cfg.algo.max_new_tokens, stop=settings.stop, step_hook=step_hook,
        recompute=cfg.actor.inflight_recompute, max_batch=cfg.actor.max_batch_rows))
    gen_s = (time.perf_counter() - t0) / max(len(indices), 1)
    flat_problems = [p for p, comps in zip(problems, outs) for _ in comps]
    texts = [decode_completion(tokenizer, c.token_ids) for comps in outs for c in comps]
    rewards = scorer.score_many(flat_problems, texts)
    groups, k = [], cfg.algo.group_size
    for j, (index, prompt, comps) in enumerate(zip(indices, prompts, outs)):
        groups.append(pack_group(actor_id, str(index), version, prompt, comps,
                                 rewards[j * k:(j + 1) * k], gen_s, grant_id=grant_id))
    return groups


def pack_group(actor_id: str, prompt_id: str, version: int, prompt: list[int],
               completions: list[Completion], rewards: list[float],
               gen_seconds: float, grant_id: int = 0) -> RolloutGroup:
    """K completions of one prompt as padded tensors (K, T), 0 in the padding."""
    k = len(completions)
    runs = version_runs(completions)
    if runs is not None:
        version = int(runs[:, 1].min())
    t = max(1, max(len(c.token_ids) for c in completions))
    ids = torch.zeros((k, t), dtype=torch.int32)
    lps = torch.zeros((k, t), dtype=torch.float32)
    lengths = torch.zeros(k, dtype=torch.int32)
    for i, c in enumerate(completions):
        n = len(c.token_ids)
        ids[i, :n] = torch.tensor(c.token_ids, dtype=torch.int32)
        lps[i, :n] = torch.tensor(c.logprobs, dtype=torch.float32).clamp(max=0.0)
        lengths[i] = n
    reasons = [c.finish_reason for c in completions]
    return RolloutGroup(
        actor_id=actor_id, prompt_id=prompt_id, policy_version=version,
        prompt_ids=torch.tensor(prompt, dtype=torch.int32), completion_ids=ids,
        completion_lengths=lengths, logprobs=lps,
        rewards=torch.tensor(rewards, dtype=torch.float32), finish_reasons=reasons,
        gen_seconds=gen_seconds, created_at=time.time(),
        info={"truncated": sum(r == "length" for r in reasons)}, grant_id=grant_id,
        version_runs=runs)


def version_runs(completions: list[Completion]) -> torch.Tensor | None:
    """Run-length per-token versions [k, version, count] of completions that
    recorded them (in-flight updates), or None when every token of the group
    has the same version (then `policy_version` alone says it)."""
    if any(c.versions is None for c in completions):
        return None
    rows = []
    for k, c in enumerate(completions):
        for version in c.versions:
            if rows and rows[-1][0] == k and rows[-1][1] == version:
                rows[-1][2] += 1
            else:
                rows.append([k, int(version), 1])
    if len({row[1] for row in rows}) <= 1:
        return None
    return torch.tensor(rows, dtype=torch.int64)
