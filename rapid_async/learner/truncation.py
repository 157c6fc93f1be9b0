"""What the learner does with completions cut at `max_new_tokens` (`algo.truncated`).

Used by the learner process (`trainer.py`), one call per mini-batch. A
completion whose `finish_reason` is "length" never reached EOS or a stop
string: its reward judges an unfinished answer. Three policies:

- "keep": train on it as it is (the reward the verifier gave).
- "zero-reward": its reward becomes 0, so running out of tokens is never
  better than a wrong answer (a length penalty when rewards are >= 0).
- "mask": it takes no part in the loss (no gradient; DAPO's "overlong
  filtering"); its reward still counts in its group's baseline, since it is a
  sample of the behaviour policy like the others.

Pure functions on tensors, tested in tests/test_truncation.py.
"""

from __future__ import annotations

import torch

POLICIES = ("keep", "zero-reward", "mask")


def apply_truncated(rewards: torch.Tensor, truncated: torch.Tensor | None,
                    policy: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rewards and loss rows for a batch under a truncation policy.

    Args:
        rewards: (B,) rewards from the verifier.
        truncated: (B,) bool, True where finish_reason is "length" (None: none were).
        policy: "keep", "zero-reward" or "mask".

    Returns:
        (B,) rewards to train on, and (B,) bool rows that take part in the
        loss (None: all rows), as `loss.compute_loss(..., loss_rows=)` takes it.
    """
    if policy not in POLICIES:
        raise ValueError(f"algo.truncated = {policy!r} is not one of {', '.join(POLICIES)}")
    if truncated is None:
        return rewards, None
    if truncated.shape != rewards.shape:
        raise ValueError(f"truncated shape {tuple(truncated.shape)} != rewards shape "
                         f"{tuple(rewards.shape)}")
    cut = truncated.bool()
    if policy == "zero-reward":
        return torch.where(cut, torch.zeros_like(rewards), rewards), None
    if policy == "mask":
        return rewards, ~cut
    return rewards, None
