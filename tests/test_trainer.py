"""Tests of rapid_async.learner.trainer: one update, the GRPO reference model."""

from __future__ import annotations

import pytest
import torch

from rapid_async.config import load_config
from rapid_async.wire.protocol import RolloutGroup
from rapid_async.tinymodel import init_model_dir
from rapid_async.learner.trainer import Trainer

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2}


def make_group(prompt, completions, rewards, version=0):
    """A RolloutGroup with behaviour log-probs of -0.5 per real token."""
    k, t = len(completions), max(len(c) for c in completions)
    ids = torch.zeros((k, t), dtype=torch.int32)
    lps = torch.zeros((k, t), dtype=torch.float32)
    for i, c in enumerate(completions):
        ids[i, :len(c)] = torch.tensor(c, dtype=torch.int32)
        lps[i, :len(c)] = -0.5
    return RolloutGroup(
        actor_id="a0", prompt_id=str(prompt), policy_version=version,
        prompt_ids=torch.tensor(prompt, dtype=torch.int32), completion_ids=ids,
        completion_lengths=torch.tensor([len(c) for c in completions], dtype=torch.int32),
        logprobs=lps, rewards=torch.tensor(rewards, dtype=torch.float32),
        finish_reasons=["stop"] * len(completions),
        gen_seconds=0.0, created_at=0.0, info={})


def two_groups(version=0):
    # Token ids 4..13 are the digits of the tiny vocabulary, 2 is <eos>, 1 <bos>.
    return [make_group([1, 5, 14, 6, 19], [[7, 2], [8, 9, 2], [5], [11, 12, 13, 2]],
                       [1.0, 0.0, 0.0, 1.0], version),
            make_group([1, 9, 15, 4, 19], [[4, 2], [13, 2], [6, 6, 2], [10]],
                       [0.0, 1.0, 0.5, 0.0], version)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small random tiny-model directory (faster updates than the default size)."""
    return init_model_dir(tmp_path_factory.mktemp("trainer") / "model", seed=0, **SMALL)


@pytest.fixture
def cfg():
    return load_config(overrides=["learner.lr=1e-3", "algo.group_size=4", "run.seed=0"])


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_update_changes_weights_and_increments_version(cfg, model_dir):
    trainer = Trainer(cfg, model_dir)
    before = weights(trainer.model)
    m = trainer.update(two_groups())
    assert trainer.version == 1
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2
    assert torch.isfinite(torch.tensor(m["grad/norm"])) and m["grad/norm"] > 0
    assert m["reward/mean"] == pytest.approx((1 + 0 + 0 + 1 + 0 + 1 + 0.5 + 0) / 8)
    assert m["staleness/mean"] == 0 and m["staleness/max"] == 0
    assert m["batch/tokens"] == 2 + 3 + 1 + 4 + 2 + 2 + 3 + 1
    # Staleness 0: the engine/trainer mismatch metrics cover every token (loss/mismatch.py).
    assert m["mismatch/tokens"] == m["batch/tokens"] and m["mismatch/k3"] > 0
    assert 0 <= m["mismatch/ratio_outside"] <= 1 and m["mismatch/engine_abs_delta"] > 0
    # Groups generated at version 0, consumed at version 1: staleness 1.
    m = trainer.update(two_groups(version=0))
    assert trainer.version == 2 and m["staleness/mean"] == 1 and m["staleness/max"] == 1
    assert "mismatch/k3" not in m  # no staleness-0 token


def test_grpo_with_kl_keeps_a_frozen_reference(model_dir):
    cfg = load_config(overrides=["algo.loss=grpo", "algo.beta=0.04", "learner.lr=1e-3"])
    trainer = Trainer(cfg, model_dir)
    ref = weights(trainer.ref_model)
    trainer.update(two_groups())
    assert all(torch.equal(v, ref[k]) for k, v in trainer.ref_model.state_dict().items())
    assert not all(torch.equal(v, ref[k]) for k, v in trainer.model.state_dict().items())


def six_groups(version=0):
    """Six groups of K = 4 with different prompt and completion lengths."""
    gen = torch.Generator().manual_seed(3)
    groups = []
    for g in range(6):
        prompt = [1] + torch.randint(4, 20, (3 + g,), generator=gen).tolist()
        completions = [torch.randint(4, 20, (1 + (g * 3 + i) % 7,), generator=gen).tolist()
                       for i in range(4)]
        groups.append(make_group(prompt, completions, [float((g + i) % 2) for i in range(4)],
                                 version))
    return groups


def grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("overrides", [
    ["algo.aggregation=sequence-mean"],
    ["algo.aggregation=token-mean"],
    ["algo.aggregation=token-mean", "algo.loss=grpo", "algo.beta=0.04"],
    ["algo.loss=pg"],
    ["algo.baseline=loo"],
    ["algo.baseline=loo", "algo.aggregation=token-mean", "algo.eta=1.2"],
])
def test_microbatched_update_equals_the_full_batch_update(model_dir, overrides):
    # Budgets: one pass; whole groups (several per micro-batch); 20 tokens, which
    # splits groups by rows (advantages then come from a no-grad pass first).
    results = {}
    for budget in (0, 64, 20):
        cfg = load_config(overrides=["learner.lr=1e-3", f"learner.micro_batch_tokens={budget}",
                                     *overrides])
        trainer = Trainer(cfg, model_dir)
        m = trainer.update(six_groups())
        results[budget] = (m, grads(trainer.model), weights(trainer.model))
    full_m, full_g, full_w = results[0]
    assert full_m["batch/microbatches"] == 1
    assert results[64][0]["batch/microbatches"] > 2 and results[20][0]["batch/microbatches"] > 6
    assert max(v.abs().max() for v in full_g.values()) > 1e-3
    for budget in (64, 20):
        m, g, w = results[budget]
        assert m["loss/total"] == pytest.approx(full_m["loss/total"], abs=1e-6)
        assert m["grad/norm"] == pytest.approx(full_m["grad/norm"], rel=1e-5)
        for k in full_g:
            torch.testing.assert_close(g[k], full_g[k], atol=1e-6, rtol=1e-5)
            # AdamW's first step moves each weight by about lr * sign(grad).
            torch.testing.assert_close(w[k], full_w[k], atol=2e-6, rtol=0)


def test_loo_baseline_reaches_the_loss(model_dir):
    # algo.baseline goes into LossSettings. Without weights (rapid_no_is) the loo advantage
    # is K/(K-1) = 4/3 times the paper's, with the same signs (so the same clip pattern):
    # the whole gradient scales by exactly 4/3.
    out = {}
    for baseline in ("paper", "loo"):
        cfg = load_config(overrides=["learner.lr=1e-3", "algo.loss=rapid_no_is",
                                     f"algo.baseline={baseline}"])
        trainer = Trainer(cfg, model_dir)
        assert trainer.settings.baseline == baseline
        trainer.update(six_groups())
        out[baseline] = grads(trainer.model)
    assert max(v.abs().max() for v in out["paper"].values()) > 1e-3
    for k in out["loo"]:
        torch.testing.assert_close(out["loo"][k], out["paper"][k] * 4 / 3, atol=1e-6, rtol=1e-4)


def test_padded_tokens_respect_the_budget(model_dir):
    cfg = load_config(overrides=["learner.micro_batch_tokens=40"])
    m = Trainer(cfg, model_dir).update(six_groups())
    longest = max(len(g.prompt_ids) + int(g.completion_lengths.max()) for g in six_groups())
    assert m["batch/padded_tokens"] <= 40 * m["batch/microbatches"]
    assert longest * 4 > 40  # the longest group alone is over the budget: it was split


# ---------------------------------------------------------------- precision


def test_bf16_compute_with_fp32_master_weights_moves_every_weight_at_lr_1e6(model_dir):
    cfg = load_config(overrides=["learner.lr=1e-6", "learner.compute_dtype=bfloat16"])
    trainer = Trainer(cfg, model_dir)
    assert trainer.compute_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    before = weights(trainer.model)
    trainer.update(two_groups())
    total = sum(v.numel() for v in before.values())
    changed = sum(int((trainer.model.state_dict()[k] != v).sum()) for k, v in before.items())
    assert changed / total > 0.9
    state = next(iter(trainer.optimizer.state.values()))
    assert state["exp_avg"].dtype == torch.float32
    # The former path, AdamW on bf16 weights, loses most of the same step.
    bf16 = {k: v.to(torch.bfloat16) for k, v in before.items()}
    stepped = {k: v.to(torch.bfloat16) for k, v in trainer.model.state_dict().items()}
    lost = sum(int((stepped[k] == v).sum()) for k, v in bf16.items())
    assert lost / total > 0.5


def test_train_dtype_must_be_float32():
    with pytest.raises(ValueError, match="learner.compute_dtype"):
        load_config(overrides=["model.train_dtype=bfloat16"])


def test_activation_checkpointing_gives_the_same_gradient(model_dir):
    results = []
    for flag in ("false", "true"):
        trainer = Trainer(load_config(overrides=[f"learner.activation_checkpointing={flag}"]),
                          model_dir)
        trainer.update(two_groups())
        results.append(grads(trainer.model))
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- guards


def test_non_finite_loss_skips_the_step(cfg, model_dir):
    trainer = Trainer(cfg, model_dir)
    before = weights(trainer.model)
    norm = trainer.model.get_decoder().norm
    hook = norm.register_forward_hook(lambda mod, inputs, out: out * float("nan"))
    m = trainer.update(two_groups())
    hook.remove()
    assert m["guard/skipped"] == 1.0 and m["guard/skipped_steps"] == 1.0
    assert trainer.version == 0 and trainer.skipped_steps == 1
    assert not trainer.optimizer.state  # no AdamW step, no moments
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    m = trainer.update(two_groups())
    assert m["guard/skipped"] == 0.0 and trainer.version == 1 and m["guard/skipped_steps"] == 1.0


def test_consecutive_skips_stop_training(model_dir):
    trainer = Trainer(load_config(overrides=["learner.max_skipped_steps=2"]), model_dir)
    trainer.model.get_decoder().norm.register_forward_hook(lambda mod, inputs, out: out * float("inf"))
    trainer.update(two_groups())
    with pytest.raises(RuntimeError, match="learner.max_skipped_steps = 2"):
        trainer.update(two_groups())


# ---------------------------------------------------------------- on a GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("budget", [0, 40])
def test_gpu_update_matches_cpu_in_fp32(model_dir, budget):
    results = {}
    for device in ("cpu", "cuda"):
        cfg = load_config(overrides=["learner.lr=1e-3", f"learner.device={device}",
                                     "learner.compute_dtype=float32",
                                     f"learner.micro_batch_tokens={budget}"])
        trainer = Trainer(cfg, model_dir)
        results[device] = (trainer.update(six_groups()), grads(trainer.model))
    assert results["cuda"][0]["loss/total"] == pytest.approx(results["cpu"][0]["loss/total"], abs=1e-5)
    for k, g in results["cpu"][1].items():
        torch.testing.assert_close(results["cuda"][1][k].cpu(), g, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_default_is_bf16_compute_and_moves_weights_at_lr_1e6(model_dir):
    cfg = load_config(overrides=["learner.lr=1e-6", "learner.device=cuda"])
    trainer = Trainer(cfg, model_dir)
    assert trainer.compute_dtype == torch.bfloat16
    before = weights(trainer.model)
    m = trainer.update(six_groups())
    assert m["guard/skipped"] == 0.0 and m["memory/peak_gib"] > 0
    total = sum(v.numel() for v in before.values())
    changed = sum(int((trainer.model.state_dict()[k] != v).sum()) for k, v in before.items())
    assert changed / total > 0.9


def test_no_vocabulary_sized_tensor_in_a_whole_update(tmp_path):
    # The full training path (collate, micro-batches, forward, backward, AdamW) under a
    # dispatch mode that records every vocabulary-sized op output beyond one chunk.
    from test_policy import LogitSizedTensors

    model_dir = init_model_dir(tmp_path / "model", seed=0, **{**SMALL, "hidden_size": 48})
    cfg = load_config(overrides=["learner.logprob_chunk_tokens=2", "learner.micro_batch_tokens=40"])
    trainer = Trainer(cfg, model_dir)
    vocab = trainer.model.config.vocab_size
    groups = six_groups()
    assert max(len(g.prompt_ids) + int(g.completion_lengths.max()) for g in groups) * 4 > 2
    with LogitSizedTensors(vocab, 48, limit=2) as mode:
        metrics = trainer.update(groups)
    assert metrics["guard/skipped"] == 0.0 and trainer.version == 1
    assert mode.seen == [], mode.seen[:5]
