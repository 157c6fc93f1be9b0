"""Engine-vs-trainer mismatch and importance-ratio diagnostics: pure tensor functions.

Used by the learner (`Trainer`, metrics `mismatch/*` of every step) and by
`compute_loss` (`is/ratio_outside`); `rapid-tune report` reads the metrics.
With r_t = log pi(y_t) - log mu(y_t) on the sampled tokens (learner minus
behaviour log-prob):

    k3_t = exp(r_t) - 1 - r_t >= 0

Tokens are drawn from mu, so E_mu[exp(r)] = 1 and E_mu[k3] = E_mu[-r] =
KL(mu || pi) per token: Schulman's k3 estimator, unbiased and never negative.
On tokens of staleness-0 groups the actor held the learner's very weights
(verified by checksum), so pi and mu differ only by the inference engine
(kernels, dtype, sampling quirks): k3 there measures engine/trainer mismatch.
The fraction of token ratios exp(r_t) outside [0.5, 2] counts the tokens whose
ratio the PPO clip (eps = 0.2) would cut hard.
"""

from __future__ import annotations

import math

import torch

RATIO_LOW, RATIO_HIGH = 0.5, 2.0
"""The token-ratio band of `ratio_outside`."""


def token_k3(delta: torch.Tensor) -> torch.Tensor:
    """(B, T) k3_t = exp(r) - 1 - r of (B, T) log-ratios r = log pi - log mu."""
    return torch.expm1(delta) - delta  # (B, T)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """() mean of (B, T) values over mask = 1 (nan when the mask is empty)."""
    m = mask.bool()
    n = m.sum()
    total = torch.where(m, values, torch.zeros_like(values)).sum()
    return total / n if n > 0 else torch.full((), math.nan, dtype=values.dtype, device=values.device)


def ratio_outside(delta: torch.Tensor, mask: torch.Tensor, low: float = RATIO_LOW,
                  high: float = RATIO_HIGH) -> torch.Tensor:
    """() share of masked tokens with exp(delta) < low or > high."""
    outside = (delta < math.log(low)) | (delta > math.log(high))  # (B, T)
    return masked_mean(outside.to(delta.dtype), mask)


def mismatch_metrics(logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                     rows: torch.Tensor) -> dict[str, float]:
    """`mismatch/*` over the completion tokens of the selected rows (e.g. staleness 0).

    Args:
        logprobs: (B, T) learner log-probs (detached).
        behaviour_logprobs: (B, T) the actor's log-probs.
        mask: (B, T) completion mask.
        rows: (B,) bool, the rows to look at.

    Returns:
        {} when the rows hold no token, else mismatch/k3 (mean k3 per token),
        mismatch/ratio_outside (share of ratios outside [0.5, 2]),
        mismatch/engine_abs_delta (mean |r|) and mismatch/tokens (count).
    """
    sel = mask.bool() & rows.bool()[:, None]  # (B, T)
    if not bool(sel.any()):
        return {}
    delta = (logprobs.double() - behaviour_logprobs.double()).masked_fill(~sel, 0.0)  # (B, T)
    return {"mismatch/k3": float(masked_mean(token_k3(delta), sel)),
            "mismatch/ratio_outside": float(ratio_outside(delta, sel)),
            "mismatch/engine_abs_delta": float(masked_mean(delta.abs(), sel)),
            "mismatch/tokens": float(sel.sum())}
