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


# ---------------------------------------------------------------- in the trainer


def _groups(truncated_rows):
    """The trainer tests' two groups, with finish_reason "length" on the given rows."""
    from test_trainer import two_groups

    groups = two_groups()
    for g_index, group in enumerate(groups):
        group.finish_reasons = ["length" if (g_index, i) in truncated_rows else "stop"
                                for i in range(4)]
    return groups


def _grad_after_update(model_dir, policy, truncated_rows, budget=0):
    from rapid_async.config import load_config
    from rapid_async.learner.trainer import Trainer

    cfg = load_config(overrides=["learner.lr=1e-3", "algo.group_size=4", "run.seed=0",
                                 f"algo.truncated={policy}", f"learner.micro_batch_tokens={budget}"])
    trainer = Trainer(cfg, model_dir)
    captured = {}
    original = trainer.optimizer.step

    def step(*args, **kwargs):
        captured["grad"] = torch.cat([p.grad.flatten() for p in trainer.model.parameters()
                                      if p.grad is not None]).clone()
        return original(*args, **kwargs)

    trainer.optimizer.step = step
    metrics = trainer.update(_groups(truncated_rows))
    return captured["grad"], metrics


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    from test_trainer import SMALL

    from rapid_async.tinymodel import init_model_dir

    return init_model_dir(tmp_path_factory.mktemp("trunc") / "model", seed=0, **SMALL)


def test_trainer_applies_the_policy(small_model, one_thread):
    every = {(g, i) for g in range(2) for i in range(4)}
    keep, m = _grad_after_update(small_model, "keep", every)
    assert keep.abs().sum() > 0 and m["batch/truncated_frac"] == 1.0
    for policy in ("zero-reward", "mask"):
        grad, _ = _grad_after_update(small_model, policy, every)
        assert grad.abs().max() == 0.0, policy
    none, _ = _grad_after_update(small_model, "mask", set())
    assert torch.equal(none, keep)  # nothing truncated: same as keep


def test_masked_rows_in_micro_batches_match_the_full_batch(small_model, one_thread):
    rows = {(0, 1), (1, 3)}
    full, _ = _grad_after_update(small_model, "mask", rows, budget=0)
    micro, m = _grad_after_update(small_model, "mask", rows, budget=8)
    assert m["batch/microbatches"] > 1
    assert torch.allclose(full, micro, atol=1e-6, rtol=1e-5)
    kept, _ = _grad_after_update(small_model, "keep", rows, budget=0)
    assert not torch.allclose(full, kept)
