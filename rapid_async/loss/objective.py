"""The learner's objective: `LossSettings` and `compute_loss` for one mini-batch.

Used by the learner process (`Trainer`) and the benchmarks (`bin/bench-mc`,
`bin/bench-weights`) through `rapid_async.loss`. `LossSettings` names the
algorithm and its hyper-parameters; `compute_loss` validates its inputs,
combines the pure pieces into RAPID, its ablation, GRPO or PG, and gathers the
`is/*`, `ppo/*`, `kl/*`, `loss/*`, `adv/*` and `batch/*` diagnostics.
"""

import math
from dataclasses import dataclass

import torch

from rapid_async.loss.mismatch import ratio_outside
from rapid_async.loss.pieces import (AGGREGATIONS, ALGORITHMS, BASELINES, GRPO_DEFAULT_BETA, aggregate,
                                     clipped_token_loss, effective_sample_size, group_advantages,
                                     k3_kl, pg_token_loss, sequence_log_weights)


@dataclass(frozen=True)
class LossSettings:
    """Which objective the learner optimises, and its hyper-parameters."""

    algorithm: str = "rapid"
    """One of "rapid", "grpo", "pg", "rapid_no_is" (see the `rapid_async.loss` docstring)."""
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
    baseline: str = "paper"
    """Group baseline: "paper" (1/K) sum_j wbar_j r_j, the sample included (DESIGN.md), or
    "loo", (1/(K-1)) sum_{j != i} wbar_j r_j, the sample left out (unbiased off-policy;
    the `rapid_async.loss` docstring). wbar_j = 1 for algorithms without weights."""

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"LossSettings.algorithm must be one of {ALGORITHMS}; got {self.algorithm!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"LossSettings.aggregation must be one of {AGGREGATIONS}; got {self.aggregation!r}"
            )
        if self.baseline not in BASELINES:
            raise ValueError(f"LossSettings.baseline must be one of {BASELINES}; got {self.baseline!r}")
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
    if settings.baseline == "loo" and group_size < 2:
        raise ValueError(f"the leave-one-out baseline (baseline = 'loo') needs group_size >= 2; got {group_size}")
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
        (`is/*` with `is/ess_per_group` the mean and `is/ess_min_group` the
        smallest ESS / K of a group and `is/ratio_outside` the share of token
        ratios outside [0.5, 2], `ppo/clip_frac`, `kl/*`, `mismatch/mean_abs_delta`,
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
    adv = group_advantages(r, group_size, w_bar, settings.scales_by_std, settings.baseline)  # (B,)

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
        ess = effective_sample_size(log_w, group_size)  # (G,) ESS / K of each group
        values = {
            "loss/total": loss.detach(),
            "loss/policy": policy_loss.detach(),
            "adv/mean": adv.mean(),
            "adv/std": adv.std(correction=0),
            "is/weight_mean": w.mean(),
            "is/weight_max": w.max(),
            "is/truncated_frac": (w > settings.eta).to(w.dtype).mean(),
            "is/ess_per_group": ess.mean(),
            "is/ess_min_group": ess.min(),
            "is/ratio_outside": ratio_outside(delta, maskf),
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
