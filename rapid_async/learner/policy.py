"""Learner-side policy evaluation: batch collation and token log-probs.

Used by the learner process. `collate` turns whole rollout groups into padded
tensors in group-major order (row b = group b // K, completion b % K), and
`token_logprobs` computes log pi_theta(y_t | x, y_<t) for every completion
token with the same temperature the actor sampled with, so that
delta = logprobs - behaviour_logprobs compares like with like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Batch:
    """A learner mini-batch of G groups of K completions (B = G * K rows).

    Attributes:
        input_ids: (B, L) prompt + completion tokens, right-padded with pad_id.
        attention_mask: (B, L) 1 on real tokens.
        positions: (B, T) index in input_ids of the logit that predicts
            completion token t (prompt_len - 1 + t); 0 on padding.
        completion_ids: (B, T) completion tokens, 0 on padding.
        mask: (B, T) float, 1 on real completion tokens.
        behaviour_logprobs: (B, T) the actor's log mu, 0 on padding.
        rewards: (B,) rewards in [0, 1].
        policy_versions: (B,) version that generated each row.
        group_size: K.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    completion_ids: torch.Tensor
    mask: torch.Tensor
    behaviour_logprobs: torch.Tensor
    rewards: torch.Tensor
    policy_versions: torch.Tensor
    group_size: int

    def to(self, device: str | torch.device) -> "Batch":
        fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                  for k, v in self.__dict__.items()}
        return Batch(**fields)


def collate(groups: list[Any], pad_id: int = 0) -> Batch:
    """Stack rollout groups (protocol.RolloutGroup) into one Batch.

    Raises:
        ValueError: if groups disagree on K.
    """
    if not groups:
        raise ValueError("collate needs at least one group")
    k = int(groups[0].completion_ids.shape[0])
    rows: list[tuple[list[int], list[int], list[float]]] = []
    rewards: list[float] = []
    versions: list[int] = []
    for g in groups:
        if int(g.completion_ids.shape[0]) != k:
            raise ValueError(f"group {g.prompt_id} has {g.completion_ids.shape[0]} "
                             f"completions, expected K = {k}")
        prompt = [int(t) for t in g.prompt_ids.tolist()]
        for i in range(k):
            n = int(g.completion_lengths[i])
            rows.append((prompt, g.completion_ids[i, :n].tolist(), g.logprobs[i, :n].tolist()))
            rewards.append(float(g.rewards[i]))
            versions.append(int(g.policy_version))
    b = len(rows)
    seq_len = max(len(p) + len(c) for p, c, _ in rows)
    t_max = max(1, max(len(c) for _, c, _ in rows))
    input_ids = torch.full((b, seq_len), pad_id, dtype=torch.long)
    attention = torch.zeros((b, seq_len), dtype=torch.long)
    positions = torch.zeros((b, t_max), dtype=torch.long)
    comp = torch.zeros((b, t_max), dtype=torch.long)
    mask = torch.zeros((b, t_max), dtype=torch.float32)
    blp = torch.zeros((b, t_max), dtype=torch.float32)
    for r, (prompt, completion, lps) in enumerate(rows):
        p, c = len(prompt), len(completion)
        input_ids[r, : p + c] = torch.tensor(prompt + completion, dtype=torch.long)
        attention[r, : p + c] = 1
        if c:
            positions[r, :c] = torch.arange(p - 1, p - 1 + c)
            comp[r, :c] = torch.tensor(completion, dtype=torch.long)
            mask[r, :c] = 1.0
            blp[r, :c] = torch.tensor(lps, dtype=torch.float32)
    return Batch(input_ids, attention, positions, comp, mask, blp,
                 torch.tensor(rewards, dtype=torch.float32),
                 torch.tensor(versions, dtype=torch.long), k)


def token_logprobs(model: torch.nn.Module, batch: Batch, temperature: float) -> torch.Tensor:
    """log pi_theta of each completion token under the tempered distribution.

    Args:
        model: a causal LM returning `.logits` of shape (B, L, V).
        batch: the collated mini-batch.
        temperature: sampling temperature used by the actor.

    Returns:
        (B, T) log-probs, 0 where batch.mask is 0. Differentiable.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, L, V)
    idx = batch.positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])  # (B, T, V)
    picked = torch.gather(logits, 1, idx).float() / temperature  # (B, T, V)
    logp = torch.log_softmax(picked, dim=-1)  # (B, T, V)
    tok = torch.gather(logp, 2, batch.completion_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return tok * batch.mask
