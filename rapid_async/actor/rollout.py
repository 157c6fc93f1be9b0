"""Rollouts: prompts -> K sampled completions -> scored `RolloutGroup`s.

Used by the actor process (`rapid_async.actor.loop`). One call generates a
chunk of granted prompts in one engine request, scores every completion with
the task's verifier and packs each prompt's K completions, behaviour log-probs
and rewards into one group for the learner.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from rapid_async.config import Config
from rapid_async.engines.base import Completion, GenerateRequest
from rapid_async.wire.protocol import RolloutGroup


def generate_groups(engine: Any, tokenizer: Any, task: Any, cfg: Config, indices: list[int],
                    version: int, actor_id: str) -> list[RolloutGroup]:
    """Generate and score the training prompts at `indices` with weights `version`.

    Returns:
        One group per index, in the same order.
    """
    problems = [task.train_problem(i) for i in indices]
    prompts = [tokenizer.encode(p.prompt) for p in problems]
    t0 = time.perf_counter()
    outs = engine.generate(GenerateRequest(
        prompts=prompts, n=cfg.algo.group_size, temperature=cfg.algo.temperature,
        max_new_tokens=cfg.algo.max_new_tokens))
    gen_s = (time.perf_counter() - t0) / max(len(indices), 1)
    groups = []
    for index, problem, prompt, comps in zip(indices, problems, prompts, outs):
        rewards = [task.reward(problem, tokenizer.decode(c.token_ids, skip_special_tokens=True))
                   for c in comps]
        groups.append(pack_group(actor_id, str(index), version, prompt, comps, rewards, gen_s))
    return groups


def pack_group(actor_id: str, prompt_id: str, version: int, prompt: list[int],
               completions: list[Completion], rewards: list[float],
               gen_seconds: float) -> RolloutGroup:
    """K completions of one prompt as padded tensors (K, T), 0 in the padding."""
    k = len(completions)
    t = max(1, max(len(c.token_ids) for c in completions))
    ids = torch.zeros((k, t), dtype=torch.int32)
    lps = torch.zeros((k, t), dtype=torch.float32)
    lengths = torch.zeros(k, dtype=torch.int32)
    for i, c in enumerate(completions):
        n = len(c.token_ids)
        ids[i, :n] = torch.tensor(c.token_ids, dtype=torch.int32)
        lps[i, :n] = torch.tensor(c.logprobs, dtype=torch.float32).clamp(max=0.0)
        lengths[i] = n
    return RolloutGroup(
        actor_id=actor_id, prompt_id=prompt_id, policy_version=version,
        prompt_ids=torch.tensor(prompt, dtype=torch.int32), completion_ids=ids,
        completion_lengths=lengths, logprobs=lps,
        rewards=torch.tensor(rewards, dtype=torch.float32),
        gen_seconds=gen_seconds, created_at=time.time(), info={})
