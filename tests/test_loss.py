"""Tests of rapid_async.loss: hand-worked values, a naive loop, gradients, validation.

The Monte Carlo tests of the gradient's expectation are in tests/test_loss_montecarlo.py.
All math in float64 on CPU.
"""

import math
import statistics

import pytest
import torch

from rapid_async.loss import (
    LossSettings,
    aggregate,
    clipped_token_loss,
    compute_loss,
    effective_sample_size,
    group_advantages,
    group_baselines,
    k3_kl,
    loss_normalisers,
    microbatch_loss,
    partial_aggregate,
    pg_token_loss,
    row_advantages,
    sequence_log_weights,
)

F64 = torch.float64
ATOL = 1e-12
PAD = -7.0  # a value on padding that must never matter

# ---------------------------------------------------------------- the hand-worked batch
# Two groups (K = 2), T = 3, padding inside the batch. Token probabilities:
#   row  pi               mu                 rho = pi/mu     tokens  w = prod rho  reward
#   0    .5  .5  .8       .5  .25 .8         1   2   1       3       2             0
#   1    .6  .9  pad      .4  .9  pad        1.5 1   -       2       1.5           1
#   2    .3  pad pad      .6  pad pad        .5  -   -       1       .5            .25
#   3    .75 .5  pad      .25 .5  pad        3   1   -       2       3             1
# Rows 0, 1 are group 0 and rows 2, 3 group 1. The reference policy (GRPO) is mu.
PI = [[0.5, 0.5, 0.8], [0.6, 0.9, 0.0], [0.3, 0.0, 0.0], [0.75, 0.5, 0.0]]
MU = [[0.5, 0.25, 0.8], [0.4, 0.9, 0.0], [0.6, 0.0, 0.0], [0.25, 0.5, 0.0]]
MASK = [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0]]
REWARDS = [0.0, 1.0, 0.25, 1.0]
LN = math.log


def hand_batch() -> dict[str, torch.Tensor]:
    """The batch above as tensors; log-probs hold PAD on padding."""
    mask = torch.tensor(MASK, dtype=F64)
    pad = torch.full_like(mask, PAD)
    logprobs = torch.where(mask.bool(), torch.log(torch.tensor(PI, dtype=F64).clamp(min=1e-9)), pad)
    behaviour = torch.where(mask.bool(), torch.log(torch.tensor(MU, dtype=F64).clamp(min=1e-9)), pad)
    return {
        "logprobs": logprobs.requires_grad_(),
        "behaviour_logprobs": behaviour,
        "mask": mask,
        "rewards": torch.tensor(REWARDS, dtype=F64),
    }


def run_hand(settings: LossSettings, with_ref: bool = False):
    """compute_loss on the hand batch; returns (loss, metrics, grad w.r.t. logprobs)."""
    batch = hand_batch()
    ref = batch["behaviour_logprobs"] if with_ref else None
    loss, metrics = compute_loss(**batch, group_size=2, settings=settings, ref_logprobs=ref)
    (grad,) = torch.autograd.grad(loss, batch["logprobs"])
    return loss.item(), metrics, grad


def test_rapid_by_hand_sequence_mean():
    # eta = 2: wbar = [min(2,2), 1.5, .5, min(3,2)] = [2, 1.5, .5, 2]
    # group 0: b = (2*0 + 1.5*1)/2 = .75      -> A = [-.75, .25]
    # group 1: b = (.5*.25 + 2*1)/2 = 1.0625  -> A = [-.8125, -.0625]
    # l = -min(rho A, clip(rho, .8, 1.2) A):
    #   row 0, A=-.75, rho [1,2,1]: [.75, 1.5 (unclipped -1.5 < -.9), .75]  mean 1.0
    #   row 1, A=.25, rho [1.5,1]:  [-.3 (clip: .3 < .375), -.25]           mean -.275
    #   row 2, A=-.8125, rho .5:    [.65 (clip: -.65 < -.40625)]           mean .65
    #   row 3, A=-.0625, rho [3,1]: [.1875, .0625]                          mean .125
    # loss = (1.0 - .275 + .65 + .125) / 4 = .375
    loss, metrics, grad = run_hand(LossSettings("rapid"))
    assert loss == pytest.approx(0.375, abs=ATOL)
    # d l / d logp = -A rho on unclipped tokens, 0 on clipped ones, times 1/(B T_i).
    expected_grad = [
        [0.75 / 12, 1.5 / 12, 0.75 / 12],
        [0.0, -0.25 / 8, 0.0],
        [0.0, 0.0, 0.0],
        [0.1875 / 8, 0.0625 / 8, 0.0],
    ]
    torch.testing.assert_close(grad, torch.tensor(expected_grad, dtype=F64), atol=ATOL, rtol=0)
    # w = [2, 1.5, .5, 3]; ESS/K: group 0 3.5^2/(2*(4+2.25)) = .98, group 1 3.5^2/(2*(.25+9))
    # |delta| summed: ln2 + ln1.5 + ln2 + ln3 = ln18 over 8 tokens;
    # k3(mu||pi) per token rho - 1 - ln rho: (1-ln2) + (.5-ln1.5) + (-.5+ln2) + (2-ln3) = 3 - ln4.5.
    expected_metrics = {
        "loss/policy": 0.375,
        "loss/total": 0.375,
        "adv/mean": (-0.75 + 0.25 - 0.8125 - 0.0625) / 4,
        "is/weight_mean": 7.0 / 4,
        "is/weight_max": 3.0,
        "is/truncated_frac": 0.25,
        "is/ess_per_group": (0.98 + 12.25 / 18.5) / 2,
        "ppo/clip_frac": 2.0 / 8,
        "mismatch/mean_abs_delta": LN(18) / 8,
        "kl/k3_behaviour": (3 - LN(4.5)) / 8,
        "batch/sequences": 4.0,
        "batch/tokens": 8.0,
    }
    for name, value in expected_metrics.items():
        assert metrics[name] == pytest.approx(value, abs=ATOL), name
    assert "kl/k3_ref" not in metrics


def test_rapid_by_hand_token_mean():
    # Same token losses; token sums per row 3.0, -.55, .65, .25 over 8 tokens.
    loss, _, grad = run_hand(LossSettings("rapid", aggregation="token-mean"))
    assert loss == pytest.approx(3.35 / 8, abs=ATOL)
    expected_grad = [
        [0.75 / 8, 1.5 / 8, 0.75 / 8],
        [0.0, -0.25 / 8, 0.0],
        [0.0, 0.0, 0.0],
        [0.1875 / 8, 0.0625 / 8, 0.0],
    ]
    torch.testing.assert_close(grad, torch.tensor(expected_grad, dtype=F64), atol=ATOL, rtol=0)


def test_rapid_by_hand_eta_inf():
    # eta = inf: group 1 baseline (.5*.25 + 3*1)/2 = 1.5625 -> A = [-1.3125, -.5625]; group 0 unchanged.
    #   row 2, rho .5:    -min(-.65625, -1.05) = 1.05 (clip)
    #   row 3, rho [3,1]: [1.6875, .5625] mean 1.125
    # loss = (1.0 - .275 + 1.05 + 1.125) / 4 = .725
    loss, metrics, _ = run_hand(LossSettings("rapid", eta=math.inf))
    assert loss == pytest.approx(0.725, abs=ATOL)
    assert metrics["is/truncated_frac"] == 0.0


def test_rapid_no_is_by_hand():
    # wbar = 1: A = r - mean r = [-.5, .5, -.375, .375]
    #   row 0, A=-.5, rho [1,2,1]:  [.5, 1.0, .5]        sum 2.0   mean 2/3
    #   row 1, A=.5, rho [1.5,1]:   [-.6 (clip), -.5]    sum -1.1  mean -.55
    #   row 2, A=-.375, rho .5:     [.3 (clip)]          sum .3    mean .3
    #   row 3, A=.375, rho [3,1]:   [-.45 (clip), -.375] sum -.825 mean -.4125
    loss, metrics, _ = run_hand(LossSettings("rapid_no_is"))
    assert loss == pytest.approx((2 / 3 - 0.55 + 0.3 - 0.4125) / 4, abs=ATOL)
    assert metrics["ppo/clip_frac"] == pytest.approx(3 / 8, abs=ATOL)
    loss, _, _ = run_hand(LossSettings("rapid_no_is", aggregation="token-mean"))
    assert loss == pytest.approx((2.0 - 1.1 + 0.3 - 0.825) / 8, abs=ATOL)


# GRPO: the unbiased group std of [0, 1] is sqrt(.5); of [.25, 1] it is sqrt(2 * .375^2) = sqrt(.28125).
A0 = 0.5 / (math.sqrt(0.5) + 1e-4)
A1 = 0.375 / (math.sqrt(0.28125) + 1e-4)
# k3 to the reference (= mu) per token, d = ln(mu/pi) = -ln rho: 1/rho + ln rho - 1:
#   rho 1 -> 0, 2 -> ln2 - .5, 1.5 -> ln1.5 - 1/3, .5 -> 1 - ln2, 3 -> ln3 - 2/3
KL_ROWS = [LN(2) - 0.5, LN(1.5) - 1 / 3, 1 - LN(2), LN(3) - 2 / 3]  # token sums of rows 0..3


def test_grpo_by_hand_sequence_mean():
    # A = [-A0, A0, -A1, A1]; same clip pattern as rapid_no_is:
    #   row 0: A0 [1, 2, 1] sum 4 A0; row 1: -A0 [1.2, 1] sum -2.2 A0;
    #   row 2: A1 * .8; row 3: -A1 [1.2, 1] sum -2.2 A1
    policy = (4 * A0 / 3 - 2.2 * A0 / 2 + 0.8 * A1 - 2.2 * A1 / 2) / 4
    kl = (KL_ROWS[0] / 3 + KL_ROWS[1] / 2 + KL_ROWS[2] / 1 + KL_ROWS[3] / 2) / 4
    settings = LossSettings("grpo")
    assert settings.beta == 0.04
    loss, metrics, _ = run_hand(settings, with_ref=True)
    assert loss == pytest.approx(policy + 0.04 * kl, abs=ATOL)
    assert metrics["loss/policy"] == pytest.approx(policy, abs=ATOL)
    assert metrics["kl/k3_ref"] == pytest.approx((LN(4.5) - 0.5) / 8, abs=ATOL)
    assert metrics["adv/mean"] == pytest.approx(0.0, abs=ATOL)


def test_grpo_by_hand_token_mean():
    policy = (4 * A0 - 2.2 * A0 + 0.8 * A1 - 2.2 * A1) / 8
    kl = sum(KL_ROWS) / 8
    loss, _, _ = run_hand(LossSettings("grpo", aggregation="token-mean"), with_ref=True)
    assert loss == pytest.approx(policy + 0.04 * kl, abs=ATOL)


def test_pg_by_hand():
    # A = [-.5, .5, -.375, .375]; l = -A logp; token sums of logp per row:
    #   row 0 ln(.5*.5*.8) = ln .2, row 1 ln(.6*.9) = ln .54, row 2 ln .3, row 3 ln(.75*.5) = ln .375
    rows = [0.5 * LN(0.2), -0.5 * LN(0.54), 0.375 * LN(0.3), -0.375 * LN(0.375)]
    loss, metrics, grad = run_hand(LossSettings("pg"))
    assert loss == pytest.approx((rows[0] / 3 + rows[1] / 2 + rows[2] + rows[3] / 2) / 4, abs=ATOL)
    assert metrics["ppo/clip_frac"] == 0.0
    # d l / d logp = -A / (B T_i)
    expected_grad = [[0.5 / 12] * 3, [-0.5 / 8, -0.5 / 8, 0], [0.375 / 4, 0, 0], [-0.375 / 8, -0.375 / 8, 0]]
    torch.testing.assert_close(grad, torch.tensor(expected_grad, dtype=F64), atol=ATOL, rtol=0)
    loss, _, _ = run_hand(LossSettings("pg", aggregation="token-mean"))
    assert loss == pytest.approx(sum(rows) / 8, abs=ATOL)


def test_std_scaled_rapid_by_hand():
    # RAPID advantages divided by the unbiased group reward std + 1e-4:
    # A = [-.75 / (sqrt(.5)+1e-4), .25 / (sqrt(.5)+1e-4), -.8125 / (sqrt(.28125)+1e-4), -.0625 / (...)].
    s0, s1 = math.sqrt(0.5) + 1e-4, math.sqrt(0.28125) + 1e-4
    _, metrics, _ = run_hand(LossSettings("rapid", std_scale_advantages=True))
    assert metrics["adv/mean"] == pytest.approx((-0.5 / s0 - 0.875 / s1) / 4, abs=ATOL)


# ---------------------------------------------------------------- leave-one-out baseline


def test_rapid_loo_by_hand_sequence_mean():
    # baseline = "loo", K = 2: b_i = wbar_j r_j of the other row j (divisor K - 1 = 1).
    # wbar = [2, 1.5, .5, 2] (eta = 2), r = [0, 1, .25, 1]:
    #   group 0: b_0 = 1.5*1 = 1.5   -> A_0 = 0 - 1.5 = -1.5
    #            b_1 = 2*0 = 0       -> A_1 = 1 - 0 = 1
    #   group 1: b_2 = 2*1 = 2       -> A_2 = .25 - 2 = -1.75
    #            b_3 = .5*.25 = .125 -> A_3 = 1 - .125 = .875
    # l = -min(rho A, clip(rho, .8, 1.2) A):
    #   row 0, A=-1.5, rho [1,2,1]: [1.5, 3 (unclipped -3 < -1.8), 1.5]       sum 6      mean 2
    #   row 1, A=1, rho [1.5,1]:    [-1.2 (clip: 1.2 < 1.5), -1]              sum -2.2   mean -1.1
    #   row 2, A=-1.75, rho .5:     [1.4 (clip: -1.4 < -.875)]                sum 1.4    mean 1.4
    #   row 3, A=.875, rho [3,1]:   [-1.05 (clip: 1.05 < 2.625), -.875]       sum -1.925 mean -.9625
    # loss = (2 - 1.1 + 1.4 - .9625) / 4 = 1.3375 / 4 = .334375
    loss, metrics, grad = run_hand(LossSettings("rapid", baseline="loo"))
    assert loss == pytest.approx(0.334375, abs=ATOL)
    assert metrics["adv/mean"] == pytest.approx((-1.5 + 1 - 1.75 + 0.875) / 4, abs=ATOL)
    assert metrics["ppo/clip_frac"] == pytest.approx(3 / 8, abs=ATOL)
    # d l / d logp = -A rho on unclipped tokens, 0 on clipped ones, times 1/(B T_i):
    #   row 0: [1.5, 3, 1.5] / (4*3); row 1: [0, -1, 0] / (4*2); row 2: 0; row 3: [0, -.875, 0] / 8
    expected_grad = [[1.5 / 12, 3 / 12, 1.5 / 12], [0.0, -1 / 8, 0.0], [0.0, 0.0, 0.0], [0.0, -0.875 / 8, 0.0]]
    torch.testing.assert_close(grad, torch.tensor(expected_grad, dtype=F64), atol=ATOL, rtol=0)


def test_rapid_loo_by_hand_token_mean():
    # Same token losses as above; token sums 6, -2.2, 1.4, -1.925 = 3.275 over 8 tokens.
    loss, _, grad = run_hand(LossSettings("rapid", baseline="loo", aggregation="token-mean"))
    assert loss == pytest.approx(3.275 / 8, abs=ATOL)
    expected_grad = [[1.5 / 8, 3 / 8, 1.5 / 8], [0.0, -1 / 8, 0.0], [0.0, 0.0, 0.0], [0.0, -0.875 / 8, 0.0]]
    torch.testing.assert_close(grad, torch.tensor(expected_grad, dtype=F64), atol=ATOL, rtol=0)


def test_group_baselines_by_hand_k3():
    # One group, K = 3: r = [1, 0, .5], wbar = [2, 1, .5] -> wbar r = [2, 0, .25], sum 2.25.
    #   paper: b = 2.25 / 3 = .75 for every row              -> A = [.25, -.75, -.25]
    #   loo:   b = [(0 + .25)/2, (2 + .25)/2, (2 + 0)/2]
    #            = [.125, 1.125, 1]                          -> A = [.875, -1.125, -.5]
    r = torch.tensor([1.0, 0.0, 0.5], dtype=F64)
    w = torch.tensor([2.0, 1.0, 0.5], dtype=F64)
    torch.testing.assert_close(group_baselines(r, 3, w, "paper"), torch.tensor([0.75] * 3, dtype=F64))
    torch.testing.assert_close(group_baselines(r, 3, w, "loo"), torch.tensor([0.125, 1.125, 1.0], dtype=F64))
    torch.testing.assert_close(group_advantages(r, 3, w, baseline="loo"),
                               torch.tensor([0.875, -1.125, -0.5], dtype=F64))
    torch.testing.assert_close(group_advantages(r, 3, w), torch.tensor([0.25, -0.75, -0.25], dtype=F64))
    # Unweighted: loo b = [(0+.5)/2, (1+.5)/2, (1+0)/2] = [.25, .75, .5] -> A = [.75, -.75, 0]
    # = K/(K-1) (r - mean r) = 1.5 * [.5, -.5, 0] (the RLOO identity).
    torch.testing.assert_close(group_advantages(r, 3, None, baseline="loo"),
                               torch.tensor([0.75, -0.75, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="baseline must be one of"):
        group_baselines(r, 3, w, "mean")
    with pytest.raises(ValueError, match="needs group_size >= 2"):
        group_baselines(r, 1, w, "loo")


def test_loo_without_weights_is_k_over_k_minus_1_times_the_mean_baseline():
    # With wbar = 1, r_i - mean_{j != i} r_j = (K/(K-1)) (r_i - mean r), so on a random batch
    # rapid_no_is + loo has advantages 4/3 those of rapid_no_is (K = 4).
    logp, mu, mask, rewards, _ = random_batch(11)
    loo = row_advantages(logp, mu, mask, rewards, 4, LossSettings("rapid_no_is", baseline="loo"))
    paper = row_advantages(logp, mu, mask, rewards, 4, LossSettings("rapid_no_is"))
    torch.testing.assert_close(loo, paper * 4 / 3, atol=1e-12, rtol=0)
    # With weights the two differ by more than a scale: the sample's own wbar_i r_i.
    loo_w = row_advantages(logp, mu, mask, rewards, 4, LossSettings("rapid", baseline="loo"))
    paper_w = row_advantages(logp, mu, mask, rewards, 4, LossSettings("rapid"))
    assert (loo_w - paper_w * 4 / 3).abs().max() > 1e-2


def test_loo_row_advantages_and_microbatch_loss_by_hand():
    # The hand batch with loo: A = [-1.5, 1, -1.75, .875], row losses [2, -1.1, 1.4, -.9625] (above).
    b = hand_batch()
    settings = LossSettings("rapid", baseline="loo")
    adv = row_advantages(b["logprobs"], b["behaviour_logprobs"], b["mask"], b["rewards"], 2, settings)
    torch.testing.assert_close(adv, torch.tensor([-1.5, 1.0, -1.75, 0.875], dtype=F64))
    rows, tokens = loss_normalisers(b["mask"])
    parts = [microbatch_loss(b["logprobs"][h], b["behaviour_logprobs"][h], b["mask"][h], adv[h],
                             settings, rows, tokens) for h in (slice(0, 2), slice(2, 4))]
    # group 0: (2 - 1.1) / 4 = .225; group 1: (1.4 - .9625) / 4 = .109375; sum .334375
    assert [p.item() for p in parts] == pytest.approx([0.225, 0.109375], abs=ATOL)


# ---------------------------------------------------------------- the small pieces


def test_sequence_log_weights_use_only_masked_tokens():
    delta = torch.tensor([[0.5, -0.25, 9.0], [1.0, 9.0, 9.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=F64)
    torch.testing.assert_close(sequence_log_weights(delta, mask), torch.tensor([0.25, 1.0], dtype=F64))


def test_group_advantages_weighted_and_scaled():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5], dtype=F64)
    w = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=F64)
    # group 0: b = (.5*1 + 2*0)/2 = .25; group 1: b = (.5 + 1.5)/2 = 1
    torch.testing.assert_close(group_advantages(r, 2, w), torch.tensor([0.75, -0.25, -0.5, -0.5], dtype=F64))
    # unweighted, std-scaled: group 0 std sqrt(.5); group 1 std 0 -> A = 0 / 1e-4 = 0
    s = math.sqrt(0.5) + 1e-4
    expected = torch.tensor([0.5 / s, -0.5 / s, 0.0, 0.0], dtype=F64)
    torch.testing.assert_close(group_advantages(r, 2, None, std_scale=True), expected)


def test_clipped_token_loss_and_clip_flags():
    delta = torch.log(torch.tensor([[0.5, 1.1, 1.5], [0.5, 1.1, 1.5]], dtype=F64))
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    loss, active = clipped_token_loss(delta, adv, 0.2)
    # A > 0: min(rho, clip(rho)) -> [.5, 1.1, 1.2]; A < 0: min(-rho, -clip(rho)) -> [-.8, -1.1, -1.5]
    torch.testing.assert_close(loss, torch.tensor([[-0.5, -1.1, -1.2], [0.8, 1.1, 1.5]], dtype=F64))
    assert active.tolist() == [[False, False, True], [True, False, False]]
    loss_inf, active_inf = clipped_token_loss(delta, adv, math.inf)
    torch.testing.assert_close(loss_inf, torch.tensor([[-0.5, -1.1, -1.5], [0.5, 1.1, 1.5]], dtype=F64))
    assert not active_inf.any()


def test_pg_token_loss_and_k3():
    logp = torch.log(torch.tensor([[0.5, 0.25]], dtype=F64))
    torch.testing.assert_close(pg_token_loss(logp, torch.tensor([2.0], dtype=F64)), -2.0 * logp)
    # k3 with o/p = 2: 2 - ln2 - 1; with o/p = .5: .5 + ln2 - 1; equal log-probs: 0
    p = torch.log(torch.tensor([0.25, 0.5, 0.3], dtype=F64))
    o = torch.log(torch.tensor([0.5, 0.25, 0.3], dtype=F64))
    k = k3_kl(p, o)
    torch.testing.assert_close(k, torch.tensor([1 - LN(2), LN(2) - 0.5, 0.0], dtype=F64))


def test_aggregate_both_ways():
    values = torch.tensor([[1.0, 2.0, 100.0], [4.0, 100.0, 100.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=F64)
    assert aggregate(values, mask, "sequence-mean").item() == pytest.approx((1.5 + 4.0) / 2, abs=ATOL)
    assert aggregate(values, mask, "token-mean").item() == pytest.approx(7.0 / 3, abs=ATOL)


def test_effective_sample_size_bounds_and_overflow():
    log_w = torch.tensor([0.0, 0.0, 0.0, 2000.0], dtype=F64)  # exp(2000) overflows
    ess = effective_sample_size(log_w, 2)
    # group 0 equal weights -> 1; group 1 one weight dominates -> 1/K = .5
    torch.testing.assert_close(ess, torch.tensor([1.0, 0.5], dtype=F64))


# ---------------------------------------------------------------- against a naive loop


def naive_loss(logp, mu, mask, rewards, k, s: LossSettings, ref=None):
    """The objective written token by token with Python loops (differentiable in logp)."""
    b, t_max = logp.shape
    totals, counts, clipped, truncated = [], [], 0, 0
    for g in range(b // k):
        rows = list(range(g * k, g * k + k))
        r = [rewards[i].item() for i in rows]
        w = [math.exp(sum((logp[i, t] - mu[i, t]).item() for t in range(t_max) if mask[i, t])) for i in rows]
        truncated += sum(wi > s.eta for wi in w)
        c = [min(wi, s.eta) for wi in w] if s.algorithm == "rapid" else [1.0] * k
        std = statistics.stdev(r) if (s.algorithm == "grpo" or s.std_scale_advantages) else None
        for n_i, (i, r_i) in enumerate(zip(rows, r)):
            if s.baseline == "loo":  # the other K - 1 samples only
                baseline = sum(cj * rj for j, (cj, rj) in enumerate(zip(c, r)) if j != n_i) / (k - 1)
            else:
                baseline = sum(cj * rj for cj, rj in zip(c, r)) / k
            adv = r_i - baseline if std is None else (r_i - baseline) / (std + 1e-4)
            total, n = 0.0, 0
            for t in range(t_max):
                if not mask[i, t]:
                    continue
                if s.algorithm == "pg":
                    token = -adv * logp[i, t]
                else:
                    rho = torch.exp(logp[i, t] - mu[i, t])
                    token = -torch.minimum(rho * adv, torch.clamp(rho, 1 - s.eps, 1 + s.eps) * adv)
                    clipped += bool(torch.clamp(rho, 1 - s.eps, 1 + s.eps) * adv < rho * adv)
                if s.beta > 0:
                    d = ref[i, t] - logp[i, t]
                    token = token + s.beta * (torch.exp(d) - d - 1)
                total, n = total + token, n + 1
            totals.append(total)
            counts.append(n)
    if s.aggregation == "sequence-mean":
        loss = sum(tot / n for tot, n in zip(totals, counts)) / b
    else:
        loss = sum(totals) / sum(counts)
    return loss, clipped / sum(counts), truncated / b


def random_batch(seed: int, groups: int = 3, k: int = 4, t: int = 5):
    """Random log-probs, a behaviour policy up to ~e^0.8 away, random 0/1 masks, rewards in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    b = groups * k
    logp = -3.0 * torch.rand(b, t, generator=gen, dtype=F64)
    mu = logp + 0.4 * torch.randn(b, t, generator=gen, dtype=F64)
    ref = logp + 0.3 * torch.randn(b, t, generator=gen, dtype=F64)
    mask = (torch.rand(b, t, generator=gen) < 0.7).to(F64)
    mask[torch.arange(b), torch.randint(0, t, (b,), generator=gen)] = 1.0  # no empty row
    rewards = torch.rand(b, generator=gen, dtype=F64)
    pad = ~mask.bool()
    logp, mu, ref = logp.masked_fill(pad, PAD), mu.masked_fill(pad, PAD), ref.masked_fill(pad, PAD)
    return logp, mu, mask, rewards, ref


VARIANTS = [
    LossSettings("rapid"),
    LossSettings("rapid", eta=1.2),
    LossSettings("rapid", eta=math.inf, eps=0.1),
    LossSettings("rapid", std_scale_advantages=True, beta=0.1),
    LossSettings("rapid_no_is"),
    LossSettings("grpo"),
    LossSettings("pg"),
    LossSettings("pg", beta=0.1),
    LossSettings("rapid", baseline="loo"),
    LossSettings("rapid", eta=1.2, baseline="loo"),
    LossSettings("rapid", eta=math.inf, eps=0.1, std_scale_advantages=True, baseline="loo"),
    LossSettings("rapid_no_is", baseline="loo"),
    LossSettings("grpo", baseline="loo"),
]


def variant_id(s: LossSettings) -> str:
    return f"{s.algorithm}-eta{s.eta}-eps{s.eps}-beta{s.beta}-{s.baseline}"


@pytest.mark.parametrize("aggregation", ["sequence-mean", "token-mean"])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_loop(seed, variant, aggregation):
    settings = LossSettings(**{**variant.__dict__, "aggregation": aggregation})
    logp, mu, mask, rewards, ref = random_batch(seed)
    lp_vec = logp.clone().requires_grad_()
    loss, metrics = compute_loss(lp_vec, mu, mask, rewards, 4, settings, ref_logprobs=ref)
    (grad,) = torch.autograd.grad(loss, lp_vec)
    lp_naive = logp.clone().requires_grad_()
    naive, clip_frac, trunc_frac = naive_loss(lp_naive, mu, mask, rewards, 4, settings, ref)
    (naive_grad,) = torch.autograd.grad(naive, lp_naive)
    assert loss.item() == pytest.approx(naive.item(), abs=1e-10)
    torch.testing.assert_close(grad, naive_grad, atol=1e-10, rtol=0)
    assert metrics["ppo/clip_frac"] == pytest.approx(clip_frac, abs=1e-12)
    assert metrics["is/truncated_frac"] == pytest.approx(trunc_frac, abs=1e-12)


def test_random_batches_exercise_clip_and_truncation():
    """Guard for the naive-loop test: its inputs do hit the clip and the truncation."""
    logp, mu, mask, rewards, _ = random_batch(0)
    _, metrics = compute_loss(logp, mu, mask, rewards, 4, LossSettings("rapid", eta=1.2))
    assert 0.1 < metrics["ppo/clip_frac"] < 0.9
    assert 0.1 < metrics["is/truncated_frac"] < 0.9


# ---------------------------------------------------------------- gradient properties


@pytest.mark.parametrize("aggregation", ["sequence-mean", "token-mean"])
def test_rapid_gradient_equals_pg_on_policy(aggregation):
    # logprobs == behaviour: w = 1 = wbar (eta >= 1), b = mean r, rho = 1 with grad rho = grad logp.
    logp, _, mask, rewards, _ = random_batch(3)
    grads = {}
    for algorithm in ("rapid", "pg"):
        lp = logp.clone().requires_grad_()
        loss, metrics = compute_loss(lp, logp, mask, rewards, 4, LossSettings(algorithm, aggregation=aggregation))
        (grads[algorithm],) = torch.autograd.grad(loss, lp)
    assert grads["rapid"].abs().max() > 1e-3
    torch.testing.assert_close(grads["rapid"], grads["pg"], atol=1e-12, rtol=0)
    assert metrics["mismatch/mean_abs_delta"] == 0.0 and metrics["kl/k3_behaviour"] == 0.0


def _grad(logp, mu, mask, rewards, settings, scale=1.0):
    lp = logp.clone().requires_grad_()
    loss, metrics = compute_loss(lp, mu, mask, rewards, 4, settings)
    (grad,) = torch.autograd.grad(loss * scale, lp)
    return grad, metrics


def test_gradient_accumulation_sequence_mean():
    # 8 groups at once == 2 micro-batches of 4 whole groups, each loss / 2: the loss is
    # a mean over equally many sequences, and the baseline only looks inside its own group.
    logp, mu, mask, rewards, _ = random_batch(4, groups=8)
    settings = LossSettings("rapid")
    full, _ = _grad(logp, mu, mask, rewards, settings)
    halves = [slice(0, 16), slice(16, 32)]
    accumulated = torch.cat([_grad(logp[h], mu[h], mask[h], rewards[h], settings, 0.5)[0] for h in halves])
    torch.testing.assert_close(accumulated, full, atol=1e-12, rtol=0)


def test_gradient_accumulation_token_mean_needs_token_share():
    # token-mean divides by the tokens of the whole batch, N = N1 + N2. A micro-batch divides
    # by its own N_m, so averaging micro-losses gives (S1/N1 + S2/N2)/2 != (S1 + S2)/N unless
    # N1 == N2. Scaling each micro-loss by N_m / N (batch/tokens metric) restores it exactly.
    logp, mu, mask, rewards, _ = random_batch(5, groups=8)
    mask[16:, 3:] = 0.0  # make the second half shorter
    settings = LossSettings("rapid", aggregation="token-mean")
    full, full_metrics = _grad(logp, mu, mask, rewards, settings)
    halves = [slice(0, 16), slice(16, 32)]
    tokens = [mask[h].sum().item() for h in halves]
    assert tokens[0] != tokens[1]
    naive = torch.cat([_grad(logp[h], mu[h], mask[h], rewards[h], settings, 0.5)[0] for h in halves])
    assert (naive - full).abs().max() > 1e-3
    scaled = []
    for h, n in zip(halves, tokens):
        grad, metrics = _grad(logp[h], mu[h], mask[h], rewards[h], settings, n / full_metrics["batch/tokens"])
        assert metrics["batch/tokens"] == n
        scaled.append(grad)
    torch.testing.assert_close(torch.cat(scaled), full, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- micro-batches


def test_partial_aggregate_by_hand():
    values = torch.tensor([[1.0, 2.0, 100.0], [4.0, 100.0, 100.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=F64)
    rows, tokens = loss_normalisers(mask)
    assert (rows, tokens) == (2.0, 3.0)
    # sequence-mean: row means 1.5 and 4, each / 2 rows -> .75 + 2 = 2.75 = (1.5 + 4) / 2
    # token-mean: sums 3 and 4, each / 3 tokens -> 1 + 4/3 = 7/3
    parts = {agg: [partial_aggregate(values[i:i + 1], mask[i:i + 1], agg, rows, tokens).item()
                   for i in (0, 1)] for agg in ("sequence-mean", "token-mean")}
    assert parts["sequence-mean"] == pytest.approx([0.75, 2.0], abs=ATOL)
    assert parts["token-mean"] == pytest.approx([1.0, 4.0 / 3], abs=ATOL)
    # A row with no loss token adds nothing and is not counted.
    empty = torch.zeros(1, 3, dtype=F64)
    assert loss_normalisers(torch.cat([mask, empty])) == (2.0, 3.0)
    assert partial_aggregate(values[:1], empty, "sequence-mean", rows, tokens).item() == 0.0


def test_row_advantages_and_microbatch_loss_by_hand():
    # The hand batch: A = [-.75, .25, -.8125, -.0625], row losses [1.0, -.275, .65, .125] (above).
    b = hand_batch()
    settings = LossSettings("rapid")
    adv = row_advantages(b["logprobs"], b["behaviour_logprobs"], b["mask"], b["rewards"], 2, settings)
    torch.testing.assert_close(adv, torch.tensor([-0.75, 0.25, -0.8125, -0.0625], dtype=F64))
    rows, tokens = loss_normalisers(b["mask"])
    parts = [microbatch_loss(b["logprobs"][h], b["behaviour_logprobs"][h], b["mask"][h], adv[h],
                             settings, rows, tokens) for h in (slice(0, 2), slice(2, 4))]
    # group 0: (1.0 - .275) / 4 = .18125; group 1: (.65 + .125) / 4 = .19375; sum .375
    assert [p.item() for p in parts] == pytest.approx([0.18125, 0.19375], abs=ATOL)


SPLITS = {"whole groups": [0, 8, 16, 32], "rows, across groups": [0, 3, 13, 14, 30, 32],
          "one row each": list(range(33))}


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("aggregation", ["sequence-mean", "token-mean"])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_microbatches_add_up_to_the_full_loss_and_gradient(variant, aggregation, split):
    # Advantages from the whole mini-batch, then any split of the rows: the micro-batch
    # losses and their accumulated gradients equal compute_loss on the whole batch.
    settings = LossSettings(**{**variant.__dict__, "aggregation": aggregation})
    logp, mu, mask, rewards, ref = random_batch(9, groups=8)
    mask[16:, 3:] = 0.0  # uneven lengths, so token shares differ
    mask[16:, 0] = 1.0
    lp_full = logp.clone().requires_grad_()
    full, _ = compute_loss(lp_full, mu, mask, rewards, 4, settings, ref_logprobs=ref)
    (full_grad,) = torch.autograd.grad(full, lp_full)
    adv = row_advantages(logp, mu, mask, rewards, 4, settings)
    rows, tokens = loss_normalisers(mask)
    lp = logp.clone().requires_grad_()
    bounds = SPLITS[split]
    total = sum(microbatch_loss(lp[a:b], mu[a:b], mask[a:b], adv[a:b], settings, rows, tokens, ref[a:b])
                for a, b in zip(bounds, bounds[1:]))
    (grad,) = torch.autograd.grad(total, lp)
    assert total.item() == pytest.approx(full.item(), abs=1e-12)
    torch.testing.assert_close(grad, full_grad, atol=1e-12, rtol=0)


def test_microbatches_of_whole_groups_need_no_advantage_pass():
    # With whole groups in each micro-batch, advantages computed inside it are the same.
    logp, mu, mask, rewards, _ = random_batch(10, groups=6)
    settings = LossSettings("rapid", eta=1.2)
    whole = row_advantages(logp, mu, mask, rewards, 4, settings)
    parts = torch.cat([row_advantages(logp[a:a + 8], mu[a:a + 8], mask[a:a + 8], rewards[a:a + 8], 4, settings)
                       for a in (0, 8, 16)])
    assert torch.equal(parts, whole)
    assert (whole != row_advantages(logp, mu, mask, rewards, 4, LossSettings("rapid_no_is"))).any()


def test_padding_values_never_matter():
    logp, mu, mask, rewards, ref = random_batch(6)
    pad = ~mask.bool()
    results = []
    for fill in (0.0, float("nan"), float("-inf")):
        lp = logp.masked_fill(pad, fill).requires_grad_()
        loss, metrics = compute_loss(
            lp, mu.masked_fill(pad, fill), mask, rewards, 4, LossSettings("grpo"), ref.masked_fill(pad, fill)
        )
        (grad,) = torch.autograd.grad(loss, lp)
        assert torch.isfinite(grad).all() and (grad[pad] == 0).all()
        results.append((loss.item(), grad, metrics))
    for loss, grad, metrics in results[1:]:
        assert loss == results[0][0] and torch.equal(grad, results[0][1]) and metrics == results[0][2]


def test_low_precision_inputs_compute_in_float32():
    logp, mu, mask, rewards, _ = random_batch(7)
    lp = logp.to(torch.bfloat16).requires_grad_()
    loss, _ = compute_loss(lp, mu.to(torch.bfloat16), mask.bool(), rewards.float(), 4, LossSettings())
    assert loss.dtype == torch.float32
    loss.backward()
    assert lp.grad is not None and lp.grad.dtype == torch.bfloat16 and torch.isfinite(lp.grad.float()).all()


# ---------------------------------------------------------------- validation


def _valid_inputs() -> dict:
    logp, mu, mask, rewards, ref = random_batch(8, groups=2, k=2, t=3)
    return {"logprobs": logp, "behaviour_logprobs": mu, "mask": mask, "rewards": rewards, "group_size": 2,
            "settings": LossSettings(), "ref_logprobs": ref}


def _with(**changes):
    return lambda kw: kw.update({key: fn(kw) for key, fn in changes.items()})


def _mask_entry(value, row=0):
    def change(kw):
        kw["mask"] = kw["mask"].clone()
        kw["mask"][row, 0] = value
    return change


def _empty_mask_row(row):
    def change(kw):
        kw["mask"] = kw["mask"].clone()
        kw["mask"][row] = 0.0
    return change


INVALID = {
    "1-d logprobs": (_with(logprobs=lambda kw: kw["logprobs"][0]), r"logprobs must have shape \(B, T\)"),
    "integer logprobs": (_with(logprobs=lambda kw: kw["logprobs"].long()), "floating-point"),
    "behaviour shape": (_with(behaviour_logprobs=lambda kw: kw["behaviour_logprobs"][:, :2]),
                        r"behaviour_logprobs must have the shape of logprobs \(4, 3\); got \(4, 2\)"),
    "mask shape": (_with(mask=lambda kw: kw["mask"][:3]), "mask must have the shape"),
    "ref shape": (_with(ref_logprobs=lambda kw: kw["ref_logprobs"].T), "ref_logprobs must have the shape"),
    "rewards shape": (_with(rewards=lambda kw: kw["rewards"][:, None]), r"rewards must have shape \(B,\) = \(4,\)"),
    "B not divisible": (_with(group_size=lambda kw: 3), "B = 4 is not divisible by group_size K = 3"),
    "group_size 0": (_with(group_size=lambda kw: 0), "group_size must be an int >= 1"),
    "group_size float": (_with(group_size=lambda kw: 2.0), "group_size must be an int >= 1"),
    "mask value 2": (_mask_entry(2.0), "mask must hold only 0 and 1"),
    "mask value .5": (_mask_entry(0.5), "mask must hold only 0 and 1"),
    "empty row": (_empty_mask_row(1), r"mask rows \[1\] are empty"),
    "nan reward": (_with(rewards=lambda kw: torch.tensor([0.0, float("nan"), 1.0, 1.0], dtype=F64)),
                   "rewards must be finite"),
    "inf behaviour": (_with(behaviour_logprobs=lambda kw: torch.full_like(kw["logprobs"], -math.inf)),
                      "behaviour_logprobs must be finite on completion tokens"),
    "grpo K=1": (_with(settings=lambda kw: LossSettings("grpo"), group_size=lambda kw: 1),
                 r"need group_size >= 2"),
    "loo K=1": (_with(settings=lambda kw: LossSettings("rapid", baseline="loo"), group_size=lambda kw: 1),
                r"leave-one-out baseline \(baseline = 'loo'\) needs group_size >= 2"),
    "beta without ref": (_with(settings=lambda kw: LossSettings("grpo"), ref_logprobs=lambda kw: None),
                         "beta = 0.04 > 0 needs ref_logprobs"),
    "settings dict": (_with(settings=lambda kw: {"algorithm": "rapid"}), "settings must be a LossSettings"),
}


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_inputs_raise(name):
    change, message = INVALID[name]
    kwargs = _valid_inputs()
    compute_loss(**kwargs)  # the unchanged inputs are fine
    change(kwargs)
    with pytest.raises(ValueError, match=message):
        compute_loss(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"algorithm": "ppo"}, "LossSettings.algorithm must be one of"),
        ({"aggregation": "mean"}, "LossSettings.aggregation must be one of"),
        ({"eta": 0.0}, "LossSettings.eta must be a number > 0"),
        ({"eta": float("nan")}, "LossSettings.eta must be a number > 0"),
        ({"eta": True}, "LossSettings.eta must be a number > 0"),
        ({"eps": -0.2}, "LossSettings.eps must be a number > 0"),
        ({"eps": "0.2"}, "LossSettings.eps must be a number > 0"),
        ({"beta": -0.1}, "LossSettings.beta must be a finite number >= 0"),
        ({"beta": math.inf}, "LossSettings.beta must be a finite number >= 0"),
        ({"std_scale_advantages": 1}, "LossSettings.std_scale_advantages must be true or false"),
        ({"baseline": "mean"}, "LossSettings.baseline must be one of"),
    ],
)
def test_invalid_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossSettings(**kwargs)


def test_settings_defaults():
    assert LossSettings() == LossSettings("rapid", 2.0, 0.2, 0.0, "sequence-mean", False, "paper")
    assert LossSettings("grpo").beta == 0.04 and LossSettings("grpo", beta=0.0).beta == 0.0
    assert LossSettings("pg").beta == 0.0 and LossSettings("grpo").scales_by_std
    with pytest.raises(AttributeError):
        LossSettings().eta = 1.0  # frozen
