"""Tests of rapid_async.loss.mismatch (engine/trainer mismatch, token-ratio band) by hand."""

import math

import pytest
import torch

from rapid_async.loss import LossSettings, compute_loss
from rapid_async.loss.mismatch import masked_mean, mismatch_metrics, ratio_outside, token_k3

F64 = torch.float64
LN = math.log


def test_k3_is_an_unbiased_estimate_of_kl_mu_pi():
    # Tokens from mu = [.5, .5], pi = [.25, .75]: sum_y mu(y) k3(y) = sum pi - 1 - sum mu ln(pi/mu)
    # = KL(mu || pi) = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln 2 + .5 ln(2/3).
    mu, pi = torch.tensor([0.5, 0.5], dtype=F64), torch.tensor([0.25, 0.75], dtype=F64)
    k3 = token_k3(torch.log(pi) - torch.log(mu))
    # per token: ratio .5 -> .5 - 1 - ln .5 = ln 2 - .5; ratio 1.5 -> .5 - ln 1.5
    torch.testing.assert_close(k3, torch.tensor([LN(2) - 0.5, 0.5 - LN(1.5)], dtype=F64))
    assert (mu * k3).sum().item() == pytest.approx(0.5 * LN(2) + 0.5 * LN(2 / 3), abs=1e-15)


def test_mismatch_metrics_by_hand():
    # row 0 (staleness 0): ratios pi/mu = [3, 1]; row 1 (stale): [.25, pad].
    mu = torch.log(torch.tensor([[0.1, 0.5], [0.8, 0.3]], dtype=F64))
    pi = torch.log(torch.tensor([[0.3, 0.5], [0.2, 0.9]], dtype=F64))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=F64)
    fresh = torch.tensor([True, False])
    m = mismatch_metrics(pi, mu, mask, fresh)
    # k3: ratio 3 -> 3 - 1 - ln 3 = 2 - ln 3; ratio 1 -> 0; mean (2 - ln 3) / 2
    assert m["mismatch/k3"] == pytest.approx((2 - LN(3)) / 2, abs=1e-12)
    assert m["mismatch/ratio_outside"] == pytest.approx(0.5, abs=1e-12)  # 3 > 2; 1 inside
    assert m["mismatch/engine_abs_delta"] == pytest.approx(LN(3) / 2, abs=1e-12)
    assert m["mismatch/tokens"] == 2.0
    # Every row: + ratio .25 (k3 .25 - 1 - ln .25 = ln 4 - .75, outside); padding ignored.
    m = mismatch_metrics(pi, mu, mask, torch.tensor([True, True]))
    assert m["mismatch/k3"] == pytest.approx((2 - LN(3) + LN(4) - 0.75) / 3, abs=1e-12)
    assert m["mismatch/ratio_outside"] == pytest.approx(2 / 3, abs=1e-12)
    assert m["mismatch/tokens"] == 3.0
    assert mismatch_metrics(pi, mu, mask, torch.tensor([False, False])) == {}


def test_ratio_outside_band_and_empty_mask():
    delta = torch.log(torch.tensor([[0.4, 0.6, 1.9, 2.1, 7.0]], dtype=F64))
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]], dtype=F64)
    assert ratio_outside(delta, mask).item() == pytest.approx(0.5, abs=1e-12)  # .4 and 2.1
    assert ratio_outside(delta, mask, 0.3, 3.0).item() == 0.0
    assert math.isnan(masked_mean(delta, torch.zeros_like(mask)).item())


def test_compute_loss_reports_ratio_band_and_worst_group_ess():
    # Two groups of K = 2, one token each. Ratios [1, 1.5 | .25, 1]:
    # outside [.5, 2]: only .25 -> 1/4. ESS/K: group 0 (2.5)^2 / (2 (1 + 2.25)) = 6.25/6.5;
    # group 1 (1.25)^2 / (2 (.0625 + 1)) = 1.5625/2.125; worst = group 1, mean of the two.
    mu = torch.zeros(4, 1, dtype=F64)
    logp = torch.log(torch.tensor([[1.0], [1.5], [0.25], [1.0]], dtype=F64))
    _, m = compute_loss(logp, mu, torch.ones(4, 1, dtype=F64), torch.tensor([1.0, 0.0, 0.5, 0.5], dtype=F64),
                        2, LossSettings("rapid"))
    assert m["is/ratio_outside"] == pytest.approx(0.25, abs=1e-12)
    assert m["is/ess_min_group"] == pytest.approx(1.5625 / 2.125, abs=1e-12)
    assert m["is/ess_per_group"] == pytest.approx((6.25 / 6.5 + 1.5625 / 2.125) / 2, abs=1e-12)
