"""The pure pieces of the policy losses: weights, advantages, token losses, reductions.

Used by the learner process through `rapid_async.loss` (which re-exports them).
Each is a small tensor function without state: the sequence importance weight,
group advantages, the clipped (PPO) and plain policy-gradient token losses, the
k3 KL estimator, masked aggregation and the effective sample size. Notation is
that of the `rapid_async.loss` docstring.
"""

import torch

ALGORITHMS = ("rapid", "grpo", "pg", "rapid_no_is")
AGGREGATIONS = ("sequence-mean", "token-mean")
BASELINES = ("paper", "loo")
"""Group baselines: "paper" = (1/K) sum_j wbar_j r_j (the sample included, DESIGN.md),
"loo" = (1/(K-1)) sum_{j != i} wbar_j r_j (the sample left out; `group_baselines`)."""
STD_EPS = 1e-4
"""Added to the group reward std before dividing (GRPO, std_scale_advantages)."""
GRPO_DEFAULT_BETA = 0.04
"""KL coefficient that `LossSettings(algorithm="grpo")` gets when beta is not given."""


def sequence_log_weights(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log of the sequence importance weight, log w_i = sum_t mask_it delta_it.

    Args:
        delta: (B, T) learner minus behaviour log-probs, zero on padding.
        mask: (B, T) completion mask (1 = token, 0 = padding).

    Returns:
        (B,) log w_i.
    """
    return (delta * mask).sum(dim=-1)  # (B,)


def group_baselines(
    rewards: torch.Tensor, group_size: int, weights: torch.Tensor | None = None, baseline: str = "paper"
) -> torch.Tensor:
    """Each row's baseline b_i from the weighted rewards wbar_j r_j of its group.

    "paper": b_i = (1/K) sum_j wbar_j r_j, the same for the whole group (sample i included).
    "loo":   b_i = (1/(K-1)) sum_{j != i} wbar_j r_j, the other K-1 samples only. Not
             self-normalised: it is the paper's baseline with sample i's own term removed
             (and the divisor K-1), so the two differ in exactly that term. b_i does not
             depend on y_i, which is all the unbiasedness argument needs (see the
             `rapid_async.loss` docstring); needs K >= 2.

    Args:
        rewards: (B,) rewards, group-major.
        group_size: K, completions per prompt.
        weights: (B,) detached baseline weights wbar_i; None means all ones.
        baseline: one of `BASELINES`.

    Returns:
        (B,) baselines, constant (no gradient).
    """
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}; got {baseline!r}")
    r = rewards.view(-1, group_size)  # (G, K)
    wr = r if weights is None else weights.view(-1, group_size) * r  # (G, K)
    if baseline == "paper":
        b = wr.mean(dim=1, keepdim=True).expand_as(wr)  # (G, K)
    else:
        if group_size < 2:
            raise ValueError(f"the leave-one-out baseline needs group_size >= 2; got {group_size}")
        others = ~torch.eye(group_size, dtype=torch.bool, device=wr.device)  # (K, K), j != i
        b = (wr[:, None, :] * others).sum(dim=-1) / (group_size - 1)  # (G, K): sum over j != i
    return b.reshape(-1).detach()  # (B,)


def group_advantages(
    rewards: torch.Tensor, group_size: int, weights: torch.Tensor | None = None, std_scale: bool = False,
    baseline: str = "paper",
) -> torch.Tensor:
    """A_i = r_i - b_i (`group_baselines`), optionally divided by (std_j r_j + 1e-4).

    Args:
        rewards: (B,) rewards, group-major.
        group_size: K, completions per prompt.
        weights: (B,) detached baseline weights wbar_i; None means all ones.
        std_scale: divide by the unbiased group std of the rewards plus 1e-4.
        baseline: "paper" (b = (1/K) sum_j wbar_j r_j) or "loo" (sample i left out).

    Returns:
        (B,) advantages, constant (no gradient).
    """
    r = rewards.view(-1, group_size)  # (G, K)
    adv = r - group_baselines(rewards, group_size, weights, baseline).view(-1, group_size)  # (G, K)
    if std_scale:
        adv = adv / (r.std(dim=1, keepdim=True) + STD_EPS)  # (G, K), unbiased std
    return adv.reshape(-1).detach()  # (B,)


def clipped_token_loss(
    delta: torch.Tensor, advantages: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO token loss l_it = -min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i).

    Args:
        delta: (B, T) log rho_it, with gradient through the learner log-probs.
        advantages: (B,) constant advantages.
        eps: clip range (> 0; inf = no clip).

    Returns:
        (B, T) token losses and (B, T) bool, True where the clip is active
        (the clipped branch is strictly smaller, so the token has no gradient).
    """
    rho = torch.exp(delta)  # (B, T)
    adv = advantages[:, None]  # (B, 1)
    unclipped = rho * adv  # (B, T)
    clipped = rho.clamp(1.0 - eps, 1.0 + eps) * adv  # (B, T)
    return -torch.minimum(unclipped, clipped), clipped < unclipped  # (B, T), (B, T)


def pg_token_loss(logprobs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Plain policy-gradient token loss l_it = -A_i logp_it.

    Args:
        logprobs: (B, T) learner log-probs (with gradient).
        advantages: (B,) constant advantages.

    Returns:
        (B, T) token losses.
    """
    return -advantages[:, None] * logprobs  # (B, T)


def k3_kl(logprobs: torch.Tensor, other_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator per token: exp(o - p) - (o - p) - 1 >= 0.

    With tokens sampled from p it estimates KL(p || o) without bias.

    Args:
        logprobs: (B, T) log-probs p of the sampled tokens.
        other_logprobs: (B, T) log-probs o of the same tokens under the other policy.

    Returns:
        (B, T) per-token k3 values.
    """
    d = other_logprobs - logprobs  # (B, T)
    return torch.exp(d) - d - 1.0  # (B, T)


def aggregate(token_values: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Reduce (B, T) token values to a scalar over the masked tokens.

    Args:
        token_values: (B, T) values, anything on padding.
        mask: (B, T) completion mask. An all-zero row takes no part (it is
            left out of sequence-mean's row count); all rows empty gives 0.
        aggregation: "sequence-mean" (mean over rows of the row's token mean)
            or "token-mean" (sum over all tokens / number of tokens).

    Returns:
        () scalar.
    """
    masked = torch.where(mask.bool(), token_values, torch.zeros_like(token_values))  # (B, T)
    if aggregation == "sequence-mean":
        n_tokens = mask.sum(dim=-1)  # (B,)
        rows = (n_tokens > 0).sum().clamp(min=1)
        return (masked.sum(dim=-1) / n_tokens.clamp(min=1)).sum() / rows
    if aggregation == "token-mean":
        return masked.sum() / mask.sum().clamp(min=1)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}; got {aggregation!r}")


def effective_sample_size(log_weights: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group normalised ESS, (sum w)^2 / (K sum w^2), in (0, 1].

    Computed from log-weights shifted by the group maximum, so huge weights do
    not overflow.

    Args:
        log_weights: (B,) log w_i, group-major.
        group_size: K.

    Returns:
        (G,) ESS / K of each group.
    """
    lw = log_weights.view(-1, group_size)  # (G, K)
    w = torch.exp(lw - lw.max(dim=1, keepdim=True).values)  # (G, K), max 1
    return w.sum(dim=1) ** 2 / (group_size * (w**2).sum(dim=1))  # (G,)
