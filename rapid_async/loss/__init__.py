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

The leave-one-out baseline (`LossSettings.baseline = "loo"`, `algo.baseline`):

    b_i = (1/(K-1)) sum_{j != i} wbar_j r_j          A_i = r_i - b_i

Everything else (wbar, rho, clip, aggregation) is unchanged. It is NOT
self-normalised (no division by sum_{j != i} wbar_j): it is the paper's b(x)
with sample i's own term wbar_i r_i removed and the divisor K-1, so a
comparison of the two isolates exactly that term. Why it is unbiased: the K
completions are drawn i.i.d. from mu, so b_i is a function of the other K-1
only and is independent of y_i. With one-token completions and the clip
inactive, g_hat = (1/K) sum_i w_i g_i (r_i - b_i), g_i = grad log pi(y_i), and

    E[w_i g_i b_i] = E_mu[w g] E[b_i] = E_pi[g] E[b_i] = 0,

so E[g_hat] = E_mu[w g r] = grad J exactly, for any eta (the truncation only
changes b_i's value, hence the variance, never the mean), any staleness and
any K >= 2; on-policy it removes the 1 - 1/K shrink as well. The paper's
baseline contains wbar_i r_i, which is correlated with g_i: E[g_hat] = grad J
- (1/K) E_pi[wbar r g] (item 1 above). b_i itself estimates E_mu[wbar r], which
is E_pi[r] only without truncation (eta = inf); that affects the variance only.
A self-normalised b_i = sum_{j != i} wbar_j r_j / sum_{j != i} wbar_j would be
just as unbiased for the gradient (also independent of y_i) and is a consistent
estimate of E_pi[r] as K grows; it is not offered, to keep the comparison to the
paper to one term. What LOO does not remove: the per-token ratio (item 2) and
the length bias of sequence-mean (item 3) for completions of several tokens:
in general E[g_hat] = E_mu[h r] - E_mu[h] E_mu[c r]. With wbar = 1 (rapid_no_is,
pg, grpo) A_i^loo = (K/(K-1)) (r_i - mean r), the RLOO advantage.

Modules (import every name from `rapid_async.loss`, which re-exports them):
- `pieces.py`: the pure pieces (sequence weights, group advantages, token
  losses, the k3 KL, aggregation, effective sample size) and the names of the
  algorithms and aggregations.
- `objective.py`: `LossSettings` (the algorithm and its hyper-parameters) and
  `compute_loss`, with its input checks and diagnostics.
- `microbatch.py`: a mini-batch's loss as an exact sum of micro-batch shares.
"""

from rapid_async.loss.microbatch import (loss_normalisers, microbatch_loss, partial_aggregate,
                                         row_advantages)
from rapid_async.loss.objective import (LossSettings, _check_inputs, _metrics, _require_positive,
                                        _token_mean, compute_loss)
from rapid_async.loss.pieces import (AGGREGATIONS, ALGORITHMS, BASELINES, GRPO_DEFAULT_BETA, STD_EPS,
                                     aggregate, clipped_token_loss, effective_sample_size,
                                     group_advantages, group_baselines, k3_kl, pg_token_loss,
                                     sequence_log_weights)

__all__ = [
    "AGGREGATIONS", "ALGORITHMS", "BASELINES", "GRPO_DEFAULT_BETA", "STD_EPS", "LossSettings",
    "aggregate", "clipped_token_loss", "compute_loss", "effective_sample_size",
    "group_advantages", "group_baselines", "k3_kl", "loss_normalisers", "microbatch_loss",
    "partial_aggregate", "pg_token_loss", "row_advantages", "sequence_log_weights",
]
