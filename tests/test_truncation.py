"""algo.truncated: what the learner does with completions cut at max_new_tokens."""

from __future__ import annotations

import pytest
import torch

from rapid_async.learner.truncation import apply_truncated
from rapid_async.loss import LossSettings, aggregate, compute_loss


def test_policies_by_hand():
    rewards = torch.tensor([1.0, 0.5, -1.0, 0.0])
    cut = torch.tensor([True, False, True, False])
    r, rows = apply_truncated(rewards, cut, "keep")
    assert torch.equal(r, rewards) and rows is None
    r, rows = apply_truncated(rewards, cut, "zero-reward")
    assert r.tolist() == [0.0, 0.5, 0.0, 0.0] and rows is None
    r, rows = apply_truncated(rewards, cut, "mask")
    assert torch.equal(r, rewards) and rows.tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="algo.truncated = 'drop'"):
        apply_truncated(rewards, cut, "drop")


def test_aggregate_leaves_out_empty_rows():
    values = torch.tensor([[1.0, 3.0], [10.0, 10.0], [5.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    # sequence-mean over the two non-empty rows: (2 + 5) / 2
    assert aggregate(values, mask, "sequence-mean").item() == pytest.approx(3.5)
    # token-mean over the three tokens: (1 + 3 + 5) / 3
    assert aggregate(values, mask, "token-mean").item() == pytest.approx(3.0)
    assert aggregate(values, torch.zeros_like(mask), "sequence-mean").item() == 0.0


def test_masked_rows_give_no_gradient_but_count_in_the_baseline():
    torch.manual_seed(0)
    g, k, t = 2, 4, 3
    logits = torch.randn(g * k, t, requires_grad=True)
    logprobs = torch.nn.functional.logsigmoid(logits)
    behaviour = logprobs.detach() - 0.05  # close to on-policy: no clipping
    mask = torch.ones(g * k, t)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    rows = torch.tensor([True, True, False, True, True, True, True, False])
    settings = LossSettings("rapid")
    loss, _ = compute_loss(logprobs, behaviour, mask, rewards, k, settings, loss_rows=rows)
    loss.backward()
    assert (logits.grad[~rows] == 0).all()
    assert (logits.grad[rows].abs().sum(dim=1) > 0).all()
    # The kept rows' loss equals the full loss restricted to them: same
    # baseline (all K rewards), mean over the 6 kept rows.
    full, _ = compute_loss(logprobs.detach(), behaviour, mask, rewards, k, settings,
                           loss_rows=torch.ones(g * k, dtype=torch.bool))
    per_row = []
    for i in range(g * k):
        one = torch.zeros(g * k, dtype=torch.bool)
        one[i] = True
        per_row.append(compute_loss(logprobs.detach(), behaviour, mask, rewards, k, settings,
                                    loss_rows=one)[0])
    per_row = torch.stack(per_row)
    assert full.item() == pytest.approx(per_row.mean().item(), abs=1e-6)
    assert loss.item() == pytest.approx(per_row[rows].mean().item(), abs=1e-6)
