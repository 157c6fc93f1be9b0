"""Monte Carlo check of the loss gradients on toy policies with exact gradients.

Not used by the actor or learner: `bin/bench-mc` runs it and writes
`benchmarks/results/loss-montecarlo.md`; `tests/test_loss.py` uses its toy
policies. A toy policy is a tiny autoregressive tree: vocabulary V, token 0
stops, at most L tokens, one logit vector per prefix. Its completions can be
enumerated, so J(theta) = E_pi[r] and its gradient are exact, and so is the
expectation of any per-group estimator (by enumerating all S^K groups).

The estimator is g_hat = -grad_theta loss of `rapid_async.loss.compute_loss` on
one group of K completions sampled from the behaviour policy mu.

Its expectation (sequence-mean, clip inactive). Write h(y) = (1/T_y) sum_t
rho_t grad log pi_t, c(y) = wbar(y) for "rapid" and 1 for "rapid_no_is". Then
g_hat = (1/K) sum_i h_i (r_i - (1/K) sum_j c_j r_j), and since y_i, y_j are
independent for j != i,

    E[g_hat] = E_mu[h r (1 - c/K)] - ((K-1)/K) E_mu[h] E_mu[c r].

E_mu[rho_t grad log pi_t | prefix] = E_pi[grad log pi_t | prefix] = 0, so E_mu[h] = 0
when all completions have the same length; with lengths that vary, the 1/T_y of
sequence-mean makes E_mu[h] != 0 and the group baseline no longer cancels (a
length bias, present on-policy too). With one-token completions h = w grad log pi,
E_mu[w grad log pi r] = grad J, so E[g_hat] = grad J - (1/K) E_pi[wbar r grad log pi]:
on-policy (1 - 1/K) grad J. For more than one token the per-token ratios make
E_mu[h r] differ from grad J (PPO's surrogate), even with eta = inf.

With the leave-one-out baseline (`LossSettings(baseline="loo")`) b_i leaves y_i
out, E[h_i b_i] = E_mu[h] E_mu[c r], so E[g_hat] = E_mu[h r] - E_mu[h] E_mu[c r]:
grad J exactly for one-token completions, at any eta and staleness.
"""

import argparse
import itertools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rapid_async.loss import LossSettings, compute_loss


@dataclass(frozen=True)
class ToyPolicy:
    """Autoregressive tree policy with enumerable completions.

    Attributes:
        vocab: V tokens; token 0 ends a completion.
        max_len: L, the longest completion.
    """

    vocab: int
    max_len: int

    @property
    def num_states(self) -> int:
        """Prefixes that can be continued: sum_{l < L} (V - 1)^l."""
        return sum((self.vocab - 1) ** length for length in range(self.max_len))

    @property
    def num_params(self) -> int:
        """One logit per (state, token)."""
        return self.num_states * self.vocab

    def enumerate(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All S completions.

        Returns:
            tokens (S, L) long, states (S, L) long (the prefix state each token is
            drawn in) and mask (S, L) float; padding holds token 0 in state 0.
        """
        state_of: dict[tuple[int, ...], int] = {}
        for length in range(self.max_len):
            for prefix in itertools.product(range(1, self.vocab), repeat=length):
                state_of[prefix] = len(state_of)
        rows = []
        for prefix in state_of:
            for tok in range(self.vocab):
                seq = prefix + (tok,)
                if tok == 0 or len(seq) == self.max_len:
                    rows.append(seq)
        tokens = torch.zeros(len(rows), self.max_len, dtype=torch.long)
        states = torch.zeros_like(tokens)
        mask = torch.zeros(len(rows), self.max_len, dtype=torch.float64)
        for i, seq in enumerate(rows):
            for t, tok in enumerate(seq):
                tokens[i, t], states[i, t], mask[i, t] = tok, state_of[seq[:t]], 1.0
        return tokens, states, mask

    def token_logprobs(self, theta: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Log-probs of completions under per-group parameters.

        Args:
            theta: (N, P) parameters, one row per group (or (P,) shared).
            ids: (N, K) indices into `enumerate()` of each group's completions.

        Returns:
            (N * K, L) token log-probs, 0 on padding.
        """
        tokens, states, mask = self.enumerate()
        n = ids.shape[0]
        logsm = torch.log_softmax(theta.expand(n, -1).reshape(n, self.num_states, self.vocab), dim=-1)
        rows = torch.arange(n)[:, None, None]  # (N, 1, 1)
        lp = logsm[rows, states[ids], tokens[ids]]  # (N, K, L)
        return (lp * mask[ids]).reshape(-1, self.max_len)  # (N*K, L)

    def sequence_probs(self, theta: torch.Tensor) -> torch.Tensor:
        """(S,) probability of each enumerated completion under theta (P,)."""
        ids = torch.arange(len(self.enumerate()[0]))[None, :]  # (1, S)
        return torch.exp(self.token_logprobs(theta, ids).sum(dim=-1))  # (S,)


def exact_gradient(policy: ToyPolicy, theta: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """grad_theta J with J = sum_y pi(y) r(y), by enumeration. Returns (P,)."""
    th = theta.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad((policy.sequence_probs(th) * rewards).sum(), th)
    return grad


def closed_form_expectation(
    policy: ToyPolicy, theta: torch.Tensor, mu_theta: torch.Tensor, rewards: torch.Tensor,
    group_size: int, settings: LossSettings,
) -> torch.Tensor:
    """E[g_hat] = E_mu[h r (1 - c/K)] - ((K-1)/K) E_mu[h] E_mu[c r] (module docstring);
    with the leave-one-out baseline E_mu[h r] - E_mu[h] E_mu[c r].

    Sequence-mean, clip inactive, "rapid" or "rapid_no_is" only. Returns (P,).
    """
    if settings.algorithm not in ("rapid", "rapid_no_is") or settings.aggregation != "sequence-mean":
        raise ValueError("closed_form_expectation covers rapid / rapid_no_is with sequence-mean only")
    k = group_size
    _, _, mask = policy.enumerate()
    ids = torch.arange(len(mask))[None, :]  # (1, S)
    th = theta.detach().clone().requires_grad_()
    logp = policy.token_logprobs(th, ids)  # (S, L)
    mu = policy.token_logprobs(mu_theta, ids)  # (S, L)
    rho = torch.exp(logp - mu) * mask  # (S, L)
    w = torch.exp(((logp - mu) * mask).sum(dim=-1)).detach()  # (S,)
    c = torch.clamp(w, max=settings.eta) if settings.algorithm == "rapid" else torch.ones_like(w)  # (S,)
    mu_seq = torch.exp(mu.sum(dim=-1))  # (S,)
    if settings.baseline == "loo":  # b_i is independent of y_i: E[h_i b_i] = E_mu[h] E_mu[c r]
        coef = mu_seq * (rewards - (mu_seq * c * rewards).sum()) / mask.sum(dim=-1)  # (S,)
    else:
        cross = (k - 1) / k * (mu_seq * c * rewards).sum()  # ((K-1)/K) E_mu[c r]
        coef = mu_seq * (rewards * (1 - c / k) - cross) / mask.sum(dim=-1)  # (S,)
    (grad,) = torch.autograd.grad((coef[:, None] * rho).sum(), th)
    return grad


def per_group_gradients(
    policy: ToyPolicy, theta: torch.Tensor, mu_theta: torch.Tensor, rewards: torch.Tensor,
    ids: torch.Tensor, settings: LossSettings,
) -> tuple[torch.Tensor, dict[str, float]]:
    """g_hat = -grad loss for each group, in one backward pass.

    Each group gets its own copy of theta; the sequence-mean loss is the mean of
    the N group losses, so N times its gradient w.r.t. copy n is group n's g_hat.

    Args:
        ids: (N, K) completion indices of each group.
        settings: the `compute_loss` settings.

    Returns:
        (N, P) per-group estimates and the loss metrics of the whole batch.
    """
    if settings.aggregation != "sequence-mean":
        raise ValueError("per-group gradients need aggregation = sequence-mean")
    n, k = ids.shape
    _, _, mask = policy.enumerate()
    th = theta.detach().expand(n, -1).clone().requires_grad_()  # (N, P)
    logp = policy.token_logprobs(th, ids)  # (N*K, L)
    mu = policy.token_logprobs(mu_theta, ids)  # (N*K, L)
    batch_mask = mask[ids].reshape(n * k, -1)  # (N*K, L)
    loss, metrics = compute_loss(logp, mu, batch_mask, rewards[ids].reshape(-1), k, settings)
    (grad,) = torch.autograd.grad(loss, th)
    return -n * grad, metrics


def tuple_expectation(
    policy: ToyPolicy, theta: torch.Tensor, mu_theta: torch.Tensor, rewards: torch.Tensor,
    group_size: int, settings: LossSettings,
) -> torch.Tensor:
    """Exact E[g_hat] by enumerating all S^K groups, weighted by their mu-probability. (P,)."""
    num = len(policy.enumerate()[0])
    ids = torch.tensor(list(itertools.product(range(num), repeat=group_size)))  # (S^K, K)
    grads, _ = per_group_gradients(policy, theta, mu_theta, rewards, ids, settings)  # (S^K, P)
    prob = policy.sequence_probs(mu_theta)[ids].prod(dim=-1)  # (S^K,)
    return (prob[:, None] * grads).sum(dim=0)


def sample_groups(policy: ToyPolicy, mu_theta: torch.Tensor, groups: int, group_size: int,
                  generator: torch.Generator) -> torch.Tensor:
    """(groups, K) completion indices drawn i.i.d. from mu."""
    probs = policy.sequence_probs(mu_theta)
    return torch.multinomial(probs, groups * group_size, replacement=True, generator=generator).view(groups, -1)


# ---------------------------------------------------------------- the benchmark


def _row(policy, theta, mu_theta, rewards, settings, groups, group_size, gen) -> dict[str, float]:
    """Exact and Monte Carlo statistics of g_hat for one setting."""
    true = exact_gradient(policy, theta, rewards)  # (P,)
    expect = tuple_expectation(policy, theta, mu_theta, rewards, group_size, settings)  # (P,)
    ids = sample_groups(policy, mu_theta, groups, group_size, gen)  # (N, K)
    grads, metrics = per_group_gradients(policy, theta, mu_theta, rewards, ids, settings)  # (N, P)
    mean = grads.mean(dim=0)  # (P,)
    se = grads.std(dim=0) / math.sqrt(groups)  # (P,)
    norm = true.norm().item()
    return {
        "exact_bias": (expect - true).norm().item() / norm,
        "cos": torch.nn.functional.cosine_similarity(expect, true, dim=0).item(),
        "scale": (expect @ true).item() / norm**2,
        "mc_bias": (mean - true).norm().item(),
        "se": se.norm().item(),
        "rmse": ((grads - true) ** 2).sum(dim=1).mean().sqrt().item(),
        "z_max": ((mean - expect).abs() / se.clamp(min=1e-300)).max().item(),
        "z_true": ((mean - true).abs() / se.clamp(min=1e-300)).max().item(),
        "truncated": metrics.get("is/truncated_frac", math.nan),
        "clip": metrics.get("ppo/clip_frac", 0.0),
        "grad_norm": norm,
    }


def _settings_grid() -> list[tuple[str, LossSettings, bool]]:
    """(label, settings, on_policy) rows of each table."""
    inf = math.inf
    rows = [("rapid, on-policy", LossSettings("rapid", eta=2.0, eps=0.2), True),
            ("rapid loo, on-policy", LossSettings("rapid", eta=2.0, eps=0.2, baseline="loo"), True)]
    for eps in (inf, 0.2):
        for eta in (inf, 4.0, 2.0, 1.5):
            rows.append(("rapid", LossSettings("rapid", eta=eta, eps=eps), False))
        for eta in (inf, 2.0):
            rows.append(("**rapid loo**", LossSettings("rapid", eta=eta, eps=eps, baseline="loo"), False))
        rows.append(("rapid_no_is", LossSettings("rapid_no_is", eps=eps), False))
    rows.append(("pg", LossSettings("pg"), False))
    return rows


HEADER = """# Monte Carlo check of the loss gradients

Produced by `{command}` ({seconds:.0f} s on CPU, torch {torch}, float64).
Code: `rapid_async/bench/mc.py`; derivation in its module docstring and in
`rapid_async/loss/__init__.py` (the leave-one-out baseline).

Toy autoregressive policies (token 0 stops, at most L tokens, one logit vector
per prefix) with fixed rewards in [0, 1]; the behaviour policy mu has logits
theta + staleness * N(0, 1). The estimator is g_hat = -grad loss of
`compute_loss` on one group of K completions drawn from mu (sequence-mean).
grad J is the exact on-policy gradient of J = E_pi[r] (enumeration).

Columns: *bias/‖∇J‖ (exact)* = ‖E[g_hat] − ∇J‖ / ‖∇J‖ with E[g_hat] computed
exactly by enumerating all S^K groups; *cos* and *scale* = cosine and
<E[g_hat], ∇J> / ‖∇J‖² (the mean baseline alone gives scale 1 − 1/K = 0.75
on-policy, and sequence-mean a further 1/T_y per completion); *MC ‖mean−∇J‖*
= norm of the Monte Carlo mean minus ∇J; *SE* = norm of the per-parameter
standard errors of that mean; *RMSE/group* = sqrt(E‖g_hat − ∇J‖²) of a
single group's estimate (a batch of G groups divides the variance part by G);
*max z* = largest |MC mean − E[g_hat]| / SE over parameters (a check of the
Monte Carlo against the exact expectation); *max z vs ∇J* = largest
|MC mean − ∇J| / SE over parameters: about 1-3 when the bias is within Monte
Carlo error, far more when it is not; *trunc* / *clip* = `is/truncated_frac`
and `ppo/clip_frac` over the Monte Carlo batch. Rows in bold use
`algo.baseline = "loo"`: the RAPID baseline with the sample left out,
b_i = (1/(K-1)) sum_{{j != i}} wbar_j r_j (everything else as the paper).

How to read it (these follow from the formulas, see `bench_mc.py`):
- one-step, on-policy or `rapid_no_is` without clip: scale exactly 0.75 = 1 − 1/K,
  cos 1 (the mean baseline includes the sample itself);
- one-step `rapid`: E[g_hat] = ∇J − (1/K) E_pi[wbar r ∇log pi]: the sample's own
  truncated weight in the baseline tilts the direction as staleness grows; a
  smaller eta shrinks the tilt; the leave-one-out baseline removes it (exact bias 0
  at every eta, Monte Carlo mean within error of ∇J: max z vs ∇J of a few),
  and on-policy it also removes the 1 − 1/K shrink (scale 1);
- two-step: per-token ratios (PPO's surrogate) and the 1/T_y of sequence-mean
  make E[g_hat] differ from ∇J even on-policy and with eta = inf, and the clip
  (eps = 0.2) removes more of the signal as staleness grows.
"""


def run(groups: int, group_size: int, staleness: float, seed: int) -> str:
    """Run every toy and setting; return the markdown report."""
    toys = {"one-step (V=6, L=1)": ToyPolicy(6, 1), "two-step (V=3, L=2)": ToyPolicy(3, 2)}
    lines = []
    for name, policy in toys.items():
        gen = torch.Generator().manual_seed(seed)
        theta = torch.randn(policy.num_params, generator=gen, dtype=torch.float64)
        mu_theta = theta + staleness * torch.randn(policy.num_params, generator=gen, dtype=torch.float64)
        rewards = torch.rand(len(policy.enumerate()[0]), generator=gen, dtype=torch.float64)
        w = policy.sequence_probs(theta) / policy.sequence_probs(mu_theta)
        lines += [f"### {name}, staleness {staleness:g}", "",
                  f"S = {len(rewards)} completions, P = {policy.num_params} parameters, K = {group_size}, "
                  f"{groups} groups per row; sequence weights pi/mu range {w.min():.3f} .. {w.max():.3f}.", "",
                  "| objective | eta | eps | bias/‖∇J‖ (exact) | cos | scale | MC ‖mean−∇J‖ | SE | RMSE/group "
                  "| max z | max z vs ∇J | trunc | clip |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, settings, on_policy in _settings_grid():
            mu = theta if on_policy else mu_theta
            s = _row(policy, theta, mu, rewards, settings, groups, group_size, gen)
            eps = "-" if settings.algorithm == "pg" else f"{getattr(settings, 'eps', math.inf):g}"
            rapid = settings.algorithm == "rapid"
            eta = f"{settings.eta:g}" if rapid else "-"
            trunc = f"{s['truncated']:.3f}" if rapid and not math.isnan(s["truncated"]) else "-"
            lines.append(
                f"| {label} | {eta} | {eps} | {s['exact_bias']:.4f} | {s['cos']:.4f} | {s['scale']:.4f} "
                f"| {s['mc_bias']:.5f} | {s['se']:.5f} | {s['rmse']:.4f} | {s['z_max']:.2f} | {s['z_true']:.1f} "
                f"| {trunc} | {s['clip']:.3f} |")
        lines += ["", f"‖∇J‖ = {s['grad_norm']:.5f}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """CLI: run the benchmark, print and write the markdown report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=100_000, help="Monte Carlo groups per row")
    parser.add_argument("--group-size", type=int, default=4, help="K, completions per group")
    parser.add_argument("--staleness", type=float, nargs="+", default=[0.25, 1.0],
                        help="std of the logit noise mu_theta - theta (one table set each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/loss-montecarlo.md")
    args = parser.parse_args(argv)
    command = " ".join(["bin/bench-mc"] + (argv if argv is not None else sys.argv[1:]))
    start = time.perf_counter()
    sections = [run(args.groups, args.group_size, stale, args.seed) for stale in args.staleness]
    seconds = time.perf_counter() - start
    report = HEADER.format(command=command, seconds=seconds, torch=torch.__version__)
    report += "\n" + "\n".join(sections)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
