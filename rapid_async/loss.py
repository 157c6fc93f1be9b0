"""Policy losses of the learner process: RAPID, its ablation, and the GRPO / PG baselines.

Used by the learner (`rapid_async.learner`): one `compute_loss` call per
mini-batch of whole groups. Pure tensor functions, no process state; every
piece is tested on CPU in `tests/test_loss.py`.

Notation (DESIGN.md section 2). A batch holds G groups of K completions, rows in
group-major order (rows g*K .. g*K+K-1 are the K completions of prompt g).
mask_it = 1 on completion tokens, 0 on padding; every sum over t uses it.

    delta_it = logp_it - mu_it                    learner minus behaviour log-prob
    w_i      = exp(sum_t delta_it)                sequence importance weight
    wbar_i   = min(w_i, eta)                      truncated, no gradient
    b(x)     = (1/K) sum_j wbar_j r_j             importance-weighted group baseline
    A_i      = r_i - b(x)                         no std scaling by default
    rho_it   = exp(delta_it)                      gradient flows through logp
    l_it     = -min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i)

Algorithms (`LossSettings.algorithm`):

- "rapid": exactly the formulas above (Huang et al. 2025, arXiv 2510.03515).
- "rapid_no_is": the ablation, wbar_i = 1, so b(x) = mean_j r_j; the token
  ratio rho_it and its clip stay.
- "grpo": DeepSeekMath's GRPO. A_i = (r_i - mean r) / (std r + 1e-4), where
  std is the *unbiased* (Bessel-corrected, K-1) group standard deviation, as in
  `torch.std` and TRL's GRPOTrainer that GRPO baselines are usually run with;
  it needs K >= 2. Same clipped token loss, plus beta * k3 per token with
  k3_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1 against a frozen
  reference (beta = 0.04 by default for grpo).
- "pg": the paper's "GRPG", plain REINFORCE with the group mean as baseline:
  A_i = r_i - mean r and l_it = -A_i logp_it. On-policy this has the same
  gradient as the clipped loss, since rho_it = 1 in value and grad rho = grad logp.

Aggregation (`LossSettings.aggregation`):
- "sequence-mean": loss = mean_i (sum_t mask_it l_it / sum_t mask_it).
- "token-mean":    loss = sum_it mask_it l_it / sum_it mask_it.

How these depart from the textbook estimator of grad J = grad E_pi[r]:
1. The baseline includes the sample itself. Per group, with the clip inactive,
   E[-grad loss] = E_mu[h r (1 - wbar/K)] - ((K-1)/K) E_mu[h] E_mu[wbar r], where
   h(y) = (1/T_y) sum_t rho_t grad logp_t (sequence-mean). E_mu[h] = 0 when all
   completions have one length; then on-policy this is (1 - 1/K) grad J (the
   GRPO / mean-baseline shrink) and off-policy the sample's own wbar tilts it:
   grad J - (1/K) E_pi[wbar r grad log pi] for one-token completions.
2. The gradient uses the per-token ratio rho_it, not the sequence weight w_i
   (w_i only enters the baseline). This is PPO's surrogate: for completions of
   more than one token it is not an unbiased importance-sampling estimate of
   grad J even with eta = inf and no clip. `bin/bench-mc` measures both biases
   (benchmarks/results/loss-montecarlo.md).
3. sequence-mean weights each token of y_i by 1/T_i (a length bias);
   token-mean weights every token equally but its normaliser depends on the
   whole batch, so micro-batches must be rescaled by their token share when
   gradients are accumulated (see `tests/test_loss.py`): `microbatch_loss`
   divides each micro-batch's sum by the whole mini-batch's count.
4. No value function, no entropy bonus, no KL unless beta > 0.
"""

import math
from dataclasses import dataclass

import torch

ALGORITHMS = ("rapid", "grpo", "pg", "rapid_no_is")
AGGREGATIONS = ("sequence-mean", "token-mean")
STD_EPS = 1e-4
"""Added to the group reward std before dividing (GRPO, std_scale_advantages)."""
GRPO_DEFAULT_BETA = 0.04
"""KL coefficient that `LossSettings(algorithm="grpo")` gets when beta is not given."""


@dataclass(frozen=True)
class LossSettings:
    """Which objective the learner optimises, and its hyper-parameters."""

    algorithm: str = "rapid"
    """One of "rapid", "grpo", "pg", "rapid_no_is" (see the module docstring)."""
    eta: float = 2.0
    """Truncation of the sequence importance weight in the baseline; > 0, inf = none."""
    eps: float = 0.2
    """PPO clip range of the token ratio; > 0, inf = no clip. Unused by "pg"."""
    beta: float | None = None
    """Coefficient of the k3 KL to the reference; None = 0.04 for grpo, 0 otherwise."""
    aggregation: str = "sequence-mean"
    """How token losses become one number: "sequence-mean" or "token-mean"."""
    std_scale_advantages: bool = False
    """Divide advantages by (group reward std + 1e-4); always on for "grpo"."""

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"LossSettings.algorithm must be one of {ALGORITHMS}; got {self.algorithm!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"LossSettings.aggregation must be one of {AGGREGATIONS}; got {self.aggregation!r}"
            )
        _require_positive("eta", self.eta)
        _require_positive("eps", self.eps)
        if self.beta is None:
            object.__setattr__(self, "beta", GRPO_DEFAULT_BETA if self.algorithm == "grpo" else 0.0)
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"LossSettings.beta must be a finite number >= 0; got {self.beta!r}")
        if not isinstance(self.std_scale_advantages, bool):
            raise ValueError(
                f"LossSettings.std_scale_advantages must be true or false; got {self.std_scale_advantages!r}"
            )

    @property
    def scales_by_std(self) -> bool:
        """Whether advantages are divided by the group reward std."""
        return self.algorithm == "grpo" or self.std_scale_advantages


def _require_positive(name: str, value: float) -> None:
    """Raise ValueError unless value is a number > 0 (inf allowed, nan not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"LossSettings.{name} must be a number > 0 (inf allowed); got {value!r}")


# ---------------------------------------------------------------- pure pieces


def sequence_log_weights(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log of the sequence importance weight, log w_i = sum_t mask_it delta_it.

    Args:
        delta: (B, T) learner minus behaviour log-probs, zero on padding.
        mask: (B, T) completion mask (1 = token, 0 = padding).

    Returns:
        (B,) log w_i.
    """
    return (delta * mask).sum(dim=-1)  # (B,)


def group_advantages(
    rewards: torch.Tensor, group_size: int, weights: torch.Tensor | None = None, std_scale: bool = False
) -> torch.Tensor:
    """A_i = r_i - (1/K) sum_j wbar_j r_j, optionally divided by (std_j r_j + 1e-4).

    Args:
        rewards: (B,) rewards, group-major.
        group_size: K, completions per prompt.
        weights: (B,) detached baseline weights wbar_i; None means all ones.
        std_scale: divide by the unbiased group std of the rewards plus 1e-4.

    Returns:
        (B,) advantages, constant (no gradient).
    """
    r = rewards.view(-1, group_size)  # (G, K)
    wr = r if weights is None else weights.view(-1, group_size) * r  # (G, K)
    adv = r - wr.mean(dim=1, keepdim=True)  # (G, K)
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


# ---------------------------------------------------------------- micro-batches
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
    return group_advantages(rewards.detach().to(dtype), group_size, w_bar, settings.scales_by_std)


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


# ---------------------------------------------------------------- validation


def _check_inputs(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    group_size: int,
    settings: LossSettings,
    ref_logprobs: torch.Tensor | None,
) -> None:
    """Raise ValueError naming the first argument that does not fit compute_loss."""
    if not isinstance(settings, LossSettings):
        raise ValueError(f"settings must be a LossSettings; got {type(settings).__name__}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1; got {group_size!r}")
    if logprobs.dim() != 2 or logprobs.shape[0] == 0 or logprobs.shape[1] == 0:
        raise ValueError(f"logprobs must have shape (B, T) with B, T >= 1; got {tuple(logprobs.shape)}")
    if not logprobs.is_floating_point():
        raise ValueError(f"logprobs must be a floating-point tensor; got {logprobs.dtype}")
    shape = tuple(logprobs.shape)
    named = {"behaviour_logprobs": behaviour_logprobs, "mask": mask}
    if ref_logprobs is not None:
        named["ref_logprobs"] = ref_logprobs
    for name, tensor in named.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have the shape of logprobs {shape}; got {tuple(tensor.shape)}")
    if tuple(rewards.shape) != shape[:1]:
        raise ValueError(f"rewards must have shape (B,) = ({shape[0]},); got {tuple(rewards.shape)}")
    if shape[0] % group_size != 0:
        raise ValueError(
            f"batch size B = {shape[0]} is not divisible by group_size K = {group_size}; "
            "a batch must hold whole groups in group-major order"
        )
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must hold only 0 and 1 (1 = completion token, 0 = padding)")
    if not (mask.sum(dim=-1) > 0).all():
        rows = torch.nonzero(mask.sum(dim=-1) == 0).flatten().tolist()
        raise ValueError(f"every sequence needs at least one completion token; mask rows {rows} are empty")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite")
    if not torch.isfinite(behaviour_logprobs[mask.bool()]).all():
        raise ValueError("behaviour_logprobs must be finite on completion tokens (mask = 1)")
    if settings.scales_by_std and group_size < 2:
        raise ValueError(f"std-scaled advantages need group_size >= 2 (unbiased std); got {group_size}")
    if settings.beta > 0 and ref_logprobs is None:
        raise ValueError(
            f"beta = {settings.beta} > 0 needs ref_logprobs (the frozen reference); pass them or set beta = 0"
        )


# ---------------------------------------------------------------- entry point


def compute_loss(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    group_size: int,
    settings: LossSettings,
    ref_logprobs: torch.Tensor | None = None,
    loss_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The learner's objective for one mini-batch of whole groups.

    Args:
        logprobs: (B, T) learner log-probs of the sampled tokens, with gradient.
        behaviour_logprobs: (B, T) the actor's log-probs of the same tokens
            (the distribution they were sampled from); no gradient is taken.
        mask: (B, T) 1 on completion tokens, 0 on padding (bool or numeric).
        rewards: (B,) one reward per completion.
        group_size: K; B = G * K, rows in group-major order.
        settings: algorithm and hyper-parameters.
        ref_logprobs: (B, T) frozen reference log-probs, needed when beta > 0.
        loss_rows: (B,) bool, rows that take part in the policy and KL loss
            (None: all). A False row gives no gradient but its reward still
            counts in its group's baseline (`algo.truncated = "mask"`).

    Returns:
        The scalar loss to minimise and a dict of float diagnostics
        (`is/*`, `ppo/clip_frac`, `kl/*`, `mismatch/mean_abs_delta`,
        `loss/*`, `adv/*`, `batch/*`).

    Raises:
        ValueError: on inconsistent shapes, B not divisible by K, a mask that is
            not 0/1 or has an empty row, or settings that need missing inputs.
    """
    _check_inputs(logprobs, behaviour_logprobs, mask, rewards, group_size, settings, ref_logprobs)
    if loss_rows is not None and tuple(loss_rows.shape) != tuple(rewards.shape):
        raise ValueError(f"loss_rows must have shape (B,) = {tuple(rewards.shape)}; got {tuple(loss_rows.shape)}")
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    m = mask.bool()  # (B, T)
    maskf = m.to(dtype)  # (B, T)
    logp = logprobs.to(dtype).masked_fill(~m, 0.0)  # (B, T), grad flows, padding 0
    mu = behaviour_logprobs.detach().to(dtype).masked_fill(~m, 0.0)  # (B, T)
    r = rewards.detach().to(dtype)  # (B,)

    delta = logp - mu  # (B, T), zero on padding
    log_w = sequence_log_weights(delta.detach(), maskf)  # (B,)
    w = torch.exp(log_w)  # (B,)
    w_bar = torch.clamp(w, max=settings.eta) if settings.algorithm == "rapid" else None  # (B,)
    adv = group_advantages(r, group_size, w_bar, settings.scales_by_std)  # (B,)

    if settings.algorithm == "pg":
        token_loss = pg_token_loss(logp, adv)  # (B, T)
        clip_active = torch.zeros_like(m)  # (B, T)
    else:
        token_loss, clip_active = clipped_token_loss(delta, adv, settings.eps)  # (B, T), (B, T)
    loss_mask = maskf if loss_rows is None else maskf * loss_rows.to(dtype)[:, None]  # (B, T)
    policy_loss = aggregate(token_loss, loss_mask, settings.aggregation)
    loss = policy_loss
    kl_ref = None
    if ref_logprobs is not None:
        ref = ref_logprobs.detach().to(dtype).masked_fill(~m, 0.0)  # (B, T)
        kl_ref = k3_kl(logp, ref)  # (B, T)
        if settings.beta > 0:
            loss = policy_loss + settings.beta * aggregate(kl_ref, loss_mask, settings.aggregation)

    metrics = _metrics(
        loss, policy_loss, delta.detach(), maskf, log_w, w, adv, clip_active, kl_ref, group_size, settings
    )
    return loss, metrics


def _token_mean(token_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, T) token_values over the masked tokens -> ()."""
    return aggregate(token_values, mask, "token-mean")


def _metrics(
    loss: torch.Tensor,
    policy_loss: torch.Tensor,
    delta: torch.Tensor,
    maskf: torch.Tensor,
    log_w: torch.Tensor,
    w: torch.Tensor,
    adv: torch.Tensor,
    clip_active: torch.Tensor,
    kl_ref: torch.Tensor | None,
    group_size: int,
    settings: LossSettings,
) -> dict[str, float]:
    """Diagnostics beside the loss, gathered into one host transfer.

    Args:
        delta: (B, T) detached learner minus behaviour log-probs, 0 on padding.
        maskf: (B, T) float completion mask.
        log_w, w: (B,) sequence log-weights and weights (untruncated).
        adv: (B,) advantages; clip_active: (B, T) bool; kl_ref: (B, T) or None.
    """
    with torch.no_grad():
        values = {
            "loss/total": loss.detach(),
            "loss/policy": policy_loss.detach(),
            "adv/mean": adv.mean(),
            "adv/std": adv.std(correction=0),
            "is/weight_mean": w.mean(),
            "is/weight_max": w.max(),
            "is/truncated_frac": (w > settings.eta).to(w.dtype).mean(),
            "is/ess_per_group": effective_sample_size(log_w, group_size).mean(),
            "ppo/clip_frac": _token_mean(clip_active.to(maskf.dtype), maskf),
            # Tokens come from mu: k3(p=mu, o=pi), shifted by mu, estimates KL(mu || pi).
            "kl/k3_behaviour": _token_mean(k3_kl(torch.zeros_like(delta), delta), maskf),
            "mismatch/mean_abs_delta": _token_mean(delta.abs(), maskf),
            "batch/sequences": torch.tensor(float(maskf.shape[0]), dtype=maskf.dtype, device=maskf.device),
            "batch/tokens": maskf.sum(),
        }
        if kl_ref is not None:
            values["kl/k3_ref"] = _token_mean(kl_ref.detach(), maskf)
        stacked = torch.stack([v.to(maskf.dtype).reshape(()) for v in values.values()]).tolist()
    return dict(zip(values, stacked))
