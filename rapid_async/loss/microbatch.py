"""Micro-batch accumulation: a mini-batch's loss as an exact sum of micro-batch shares.

Used by the learner process (`Trainer`) when a mini-batch is too large for one
forward/backward pass; `rapid_async.loss` re-exports these names.
"""

import torch

from rapid_async.loss.objective import LossSettings
from rapid_async.loss.pieces import (AGGREGATIONS, clipped_token_loss, group_advantages, k3_kl,
                                     pg_token_loss, sequence_log_weights)

# A mini-batch too large for one pass is split into micro-batches whose
# gradients are accumulated. The loss is a sum over rows (sequence-mean) or
# tokens (token-mean) divided by a count over the WHOLE mini-batch, so each
# micro-batch contributes its partial sum divided by the mini-batch's count,
# and the contributions add up to the mini-batch loss exactly. Advantages
# depend on the whole group, so micro-batches get them from `row_advantages`
# computed on whole groups (the learner never splits a group unless it must,
# and then computes them first, over the mini-batch).


def row_advantages(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    group_size: int,
    settings: LossSettings,
) -> torch.Tensor:
    """A_i of every row, as `compute_loss` computes them (no gradient).

    Args:
        logprobs: (B, T) learner log-probs (read only by "rapid", for wbar_i).
        behaviour_logprobs: (B, T) the actor's log-probs.
        mask: (B, T) completion mask: the tokens of w_i.
        rewards: (B,) rewards, whole groups in group-major order.
        group_size: K.
        settings: algorithm and hyper-parameters.

    Returns:
        (B,) constant advantages.
    """
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    m = mask.bool()  # (B, T)
    w_bar = None
    if settings.algorithm == "rapid":
        delta = (logprobs.detach().to(dtype) - behaviour_logprobs.to(dtype)).masked_fill(~m, 0.0)  # (B, T)
        w_bar = torch.clamp(torch.exp(sequence_log_weights(delta, m.to(dtype))), max=settings.eta)  # (B,)
    return group_advantages(rewards.detach().to(dtype), group_size, w_bar, settings.scales_by_std,
                            settings.baseline)


def loss_normalisers(loss_mask: torch.Tensor) -> tuple[float, float]:
    """The mini-batch's divisors: (rows with a loss token, loss tokens).

    Args:
        loss_mask: (B, T) 1 on the tokens that take part in the loss.

    Returns:
        (rows, tokens), each at least 1: sequence-mean divides by rows,
        token-mean by tokens.
    """
    per_row = loss_mask.sum(dim=-1)  # (B,)
    return max(float((per_row > 0).sum()), 1.0), max(float(per_row.sum()), 1.0)


def partial_aggregate(
    token_values: torch.Tensor, mask: torch.Tensor, aggregation: str, rows: float, tokens: float
) -> torch.Tensor:
    """A micro-batch's share of `aggregate` over the mini-batch it belongs to.

    Args:
        token_values: (b, T) values of the micro-batch's rows, anything on padding.
        mask: (b, T) loss mask of those rows.
        aggregation: "sequence-mean" or "token-mean".
        rows, tokens: `loss_normalisers` of the whole mini-batch.

    Returns:
        () sum_i (sum_t m v / sum_t m) / rows (sequence-mean; rows without
        tokens add 0) or sum_it m v / tokens (token-mean).
    """
    masked = torch.where(mask.bool(), token_values, torch.zeros_like(token_values))  # (b, T)
    if aggregation == "sequence-mean":
        return (masked.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)).sum() / rows
    if aggregation == "token-mean":
        return masked.sum() / tokens
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}; got {aggregation!r}")


def microbatch_loss(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    advantages: torch.Tensor,
    settings: LossSettings,
    rows: float,
    tokens: float,
    ref_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of a micro-batch, scaled so that micro-batch losses add up to `compute_loss`.

    Args:
        logprobs: (b, T) learner log-probs, with gradient.
        behaviour_logprobs: (b, T) the actor's log-probs.
        loss_mask: (b, T) tokens that take part in the loss.
        advantages: (b,) the rows' `row_advantages` (computed on whole groups).
        settings: algorithm and hyper-parameters.
        rows, tokens: `loss_normalisers` of the whole mini-batch.
        ref_logprobs: (b, T) reference log-probs, needed when beta > 0.

    Returns:
        () this micro-batch's share of the mini-batch loss.
    """
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    m = loss_mask.bool()  # (b, T)
    logp = logprobs.to(dtype).masked_fill(~m, 0.0)  # (b, T)
    mu = behaviour_logprobs.detach().to(dtype).masked_fill(~m, 0.0)  # (b, T)
    adv = advantages.detach().to(dtype)  # (b,)
    if settings.algorithm == "pg":
        token_loss = pg_token_loss(logp, adv)  # (b, T)
    else:
        token_loss, _ = clipped_token_loss(logp - mu, adv, settings.eps)  # (b, T)
    if settings.beta > 0:
        if ref_logprobs is None:
            raise ValueError(f"beta = {settings.beta} > 0 needs ref_logprobs")
        ref = ref_logprobs.detach().to(dtype).masked_fill(~m, 0.0)  # (b, T)
        token_loss = token_loss + settings.beta * k3_kl(logp, ref)  # (b, T)
    return partial_aggregate(token_loss, m.to(dtype), settings.aggregation, rows, tokens)
