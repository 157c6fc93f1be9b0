"""Monte Carlo and exact-expectation tests of the RAPID gradient on toy policies.

The toy policies (rapid_async.bench.mc.ToyPolicy) have few enough completions
that J = E_pi[r], its gradient, and the expectation of the per-group estimator
g_hat = -grad loss are all computable by enumeration. Derivation of E[g_hat]
(see also rapid_async/bench_mc.py): with g_i = grad log pi(y_i), one-token
completions and the clip inactive,

    g_hat = (1/K) sum_i w_i g_i (r_i - (1/K) sum_j wbar_j r_j).

For j != i the samples are independent and E_mu[w g] = E_pi[g] = 0, so the cross
terms vanish; the j = i term does not:

    E[g_hat] = E_mu[w g r] - (1/K) E_mu[w g wbar r] = grad J - (1/K) E_pi[wbar r g].

On-policy (w = 1) this is (1 - 1/K) grad J, the GRPO / mean-baseline shrink.
With completions of several tokens and varying length the general form is
E_mu[h r (1 - c/K)] - ((K-1)/K) E_mu[h] E_mu[c r], h = (1/T) sum_t rho_t grad log pi_t
(`closed_form_expectation`), checked here against all S^K groups.
The production loss keeps DESIGN.md's baseline (sample included); the tests
check it against this expectation, not against grad J.
"""

import math

import pytest
import torch

from rapid_async.bench.mc import (
    ToyPolicy,
    closed_form_expectation,
    exact_gradient,
    per_group_gradients,
    sample_groups,
    tuple_expectation,
)
from rapid_async.loss import LossSettings

F64 = torch.float64


def toy_problem(policy: ToyPolicy, spread: float, seed: int):
    """theta ~ N(0, 1), mu_theta = theta + U(-spread, spread), rewards ~ U(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(policy.num_params, generator=gen, dtype=F64)
    mu_theta = theta + spread * (2 * torch.rand(policy.num_params, generator=gen, dtype=F64) - 1)
    rewards = torch.rand(len(policy.enumerate()[0]), generator=gen, dtype=F64)
    return theta, mu_theta, rewards, gen


def max_abs_token_log_ratio(policy: ToyPolicy, theta: torch.Tensor, mu_theta: torch.Tensor) -> float:
    """Largest |log pi_t - log mu_t| over all tokens of all completions."""
    ids = torch.arange(len(policy.enumerate()[0]))[None, :]
    return (policy.token_logprobs(theta, ids) - policy.token_logprobs(mu_theta, ids)).abs().max().item()


def test_toy_policy_is_a_distribution():
    policy = ToyPolicy(3, 2)
    tokens, _, mask = policy.enumerate()
    assert tokens.tolist() == [[0, 0], [1, 0], [1, 1], [1, 2], [2, 0], [2, 1], [2, 2]]
    assert mask.sum(dim=1).tolist() == [1, 2, 2, 2, 2, 2, 2]
    probs = policy.sequence_probs(torch.randn(policy.num_params, dtype=F64))
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    "settings",
    [LossSettings("rapid", eta=math.inf), LossSettings("rapid", eta=1.05), LossSettings("rapid_no_is"),
     LossSettings("rapid", eta=1.05, baseline="loo"), LossSettings("rapid_no_is", baseline="loo")],
    ids=["rapid-eta-inf", "rapid-eta-1.05", "rapid_no_is", "rapid-loo-eta-1.05", "rapid_no_is-loo"],
)
def test_closed_form_equals_enumeration_of_all_groups(settings):
    # Two-step policy with padding (completions of 1 or 2 tokens), K = 3: all 7^3 groups.
    policy = ToyPolicy(3, 2)
    theta, mu_theta, rewards, _ = toy_problem(policy, spread=0.08, seed=1)
    # |logit shift| <= .08 bounds every token log-ratio by .16 < ln 1.2, so the clip never acts.
    assert max_abs_token_log_ratio(policy, theta, mu_theta) < math.log(1.2)
    w = policy.sequence_probs(theta) / policy.sequence_probs(mu_theta)
    if settings.algorithm == "rapid" and settings.eta < math.inf:
        assert (w > settings.eta).any()  # the truncation is exercised
    exact = tuple_expectation(policy, theta, mu_theta, rewards, 3, settings)
    closed = closed_form_expectation(policy, theta, mu_theta, rewards, 3, settings)
    assert exact.abs().max() > 1e-3
    torch.testing.assert_close(closed, exact, atol=1e-13, rtol=0)


def test_on_policy_expectation_is_shrunk_true_gradient():
    # One-token completions, mu = pi: E[g_hat] = (1 - 1/K) grad J exactly.
    policy = ToyPolicy(5, 1)
    theta, _, rewards, _ = toy_problem(policy, spread=0.0, seed=2)
    exact = tuple_expectation(policy, theta, theta, rewards, 4, LossSettings("rapid"))
    torch.testing.assert_close(exact, 0.75 * exact_gradient(policy, theta, rewards), atol=1e-13, rtol=0)


@pytest.mark.parametrize("eta", [math.inf, 1.5])
def test_leave_one_out_baseline_is_unbiased_for_one_token(eta):
    # algo.baseline = "loo": b_i leaves sample i out, so E[g_hat] = grad J exactly, at any eta,
    # far off-policy (spread 2); the paper's baseline is not (its exact bias is large here).
    policy = ToyPolicy(4, 1)
    theta, mu_theta, rewards, _ = toy_problem(policy, spread=2.0, seed=5)
    true = exact_gradient(policy, theta, rewards)
    loo = LossSettings("rapid", eta=eta, eps=math.inf, baseline="loo")
    exact = tuple_expectation(policy, theta, mu_theta, rewards, 3, loo)
    torch.testing.assert_close(exact, true, atol=1e-13, rtol=0)
    paper = tuple_expectation(policy, theta, mu_theta, rewards, 3, LossSettings("rapid", eta=eta, eps=math.inf))
    assert (paper - true).norm() > 0.1 * true.norm()


def test_monte_carlo_loo_is_within_error_of_the_true_gradient():
    # One-token completions, K = 4, 20000 groups from a stale mu (spread 2, eta 2, no clip):
    # the loo mean is within 4 standard errors of grad J on every parameter, the paper's
    # is more than 10 away on some (the sample's own weight in its baseline).
    policy, k, groups = ToyPolicy(6, 1), 4, 20_000
    theta, mu_theta, rewards, gen = toy_problem(policy, spread=2.0, seed=3)
    true = exact_gradient(policy, theta, rewards)
    z = {}
    for baseline in ("paper", "loo"):
        settings = LossSettings("rapid", eta=2.0, eps=math.inf, baseline=baseline)
        ids = sample_groups(policy, mu_theta, groups, k, gen)
        grads, metrics = per_group_gradients(policy, theta, mu_theta, rewards, ids, settings)
        assert metrics["is/truncated_frac"] > 0.05  # the truncation is exercised
        mean, se = grads.mean(dim=0), grads.std(dim=0) / math.sqrt(groups)
        z[baseline] = ((mean - true).abs() / se).max().item()
    assert z["loo"] < 4.0, z
    assert z["paper"] > 10.0, z


def independent_expectation(policy, theta, mu_theta, rewards, k, eta):
    """grad J - (1/K) E_pi[wbar r grad log pi] = grad_theta sum_y pi(y) r(y) (1 - wbar(y)/K), wbar fixed."""
    w = (policy.sequence_probs(theta) / policy.sequence_probs(mu_theta)).clamp(max=eta)  # (S,)
    th = theta.clone().requires_grad_()
    (grad,) = torch.autograd.grad((policy.sequence_probs(th) * rewards * (1 - w / k)).sum(), th)
    return grad


@pytest.mark.parametrize(
    "eta, eps, spread",
    [(math.inf, 0.2, 0.08), (2.0, math.inf, 2.0)],
    ids=["eta-inf-clip-0.2", "eta-2-no-clip"],
)
def test_monte_carlo_gradient_matches_derived_expectation(eta, eps, spread):
    # One-token completions (softmax over 6 "sequences"), K = 4, 20000 groups sampled from mu.
    policy, k, groups = ToyPolicy(6, 1), 4, 20_000
    theta, mu_theta, rewards, gen = toy_problem(policy, spread=spread, seed=3)
    settings = LossSettings("rapid", eta=eta, eps=eps)
    ids = sample_groups(policy, mu_theta, groups, k, gen)
    grads, metrics = per_group_gradients(policy, theta, mu_theta, rewards, ids, settings)  # (N, P)
    assert metrics["ppo/clip_frac"] == 0.0
    if eta < math.inf:
        assert metrics["is/truncated_frac"] > 0.05
    mean, se = grads.mean(dim=0), grads.std(dim=0) / math.sqrt(groups)  # (P,), (P,)
    expected = independent_expectation(policy, theta, mu_theta, rewards, k, eta)
    assert ((mean - expected).abs() <= 3 * se).all(), ((mean - expected) / se).tolist()
    # The (1/K) self-baseline term is real: grad J itself lies many standard errors away.
    true = exact_gradient(policy, theta, rewards)
    assert ((mean - true).abs() / se).max() > 10


def test_monte_carlo_two_step_matches_closed_form():
    # Completions of one or two tokens: per-token ratios and the 1/T of sequence-mean make
    # E[g_hat] the general closed form of the module docstring, not a multiple of grad J.
    policy, k, groups = ToyPolicy(3, 2), 4, 20_000
    theta, mu_theta, rewards, gen = toy_problem(policy, spread=0.08, seed=4)
    settings = LossSettings("rapid", eta=math.inf)
    ids = sample_groups(policy, mu_theta, groups, k, gen)
    grads, metrics = per_group_gradients(policy, theta, mu_theta, rewards, ids, settings)
    assert metrics["ppo/clip_frac"] == 0.0
    mean, se = grads.mean(dim=0), grads.std(dim=0) / math.sqrt(groups)
    expected = closed_form_expectation(policy, theta, mu_theta, rewards, k, settings)
    assert ((mean - expected).abs() <= 3 * se).all(), ((mean - expected) / se).tolist()
