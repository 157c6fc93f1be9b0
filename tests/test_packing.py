"""Tests of sequence packing (rapid_async.learner.packing, `learner.packing`)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rapid_async.config import load_config
from rapid_async.learner.packing import (pack_bins, pack_sequences, packed_rank_rows, packed_tokens,
                                         plan_packed_microbatches)
from rapid_async.learner.policy import PolicyLogprobs, collate
from rapid_async.learner.trainer import Trainer
from rapid_async.tinymodel import build_model, init_model_dir
from tests.test_trainer import make_group

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2}


def random_groups(seed: int, n_groups: int = 3, k: int = 4, vocab: int = 24) -> list:
    rng = random.Random(seed)
    groups = []
    for g in range(n_groups):
        prompt = [1] + [rng.randrange(4, vocab) for _ in range(rng.randrange(2, 9))]
        comps = [[rng.randrange(4, vocab) for _ in range(rng.randrange(1, 12))] for _ in range(k)]
        groups.append(make_group(prompt, comps, [float(rng.random() < 0.5) for _ in range(k)]))
    return groups


def qwen2_gqa() -> torch.nn.Module:
    """A small random Qwen2 with grouped-query attention, built from code."""
    torch.manual_seed(3)
    cfg = Qwen2Config(vocab_size=40, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg).float()


def logprobs_and_grads(model, batch, packing: bool):
    model.zero_grad(set_to_none=True)
    policy = PolicyLogprobs(model, temperature=0.9, chunk_tokens=5, packing=packing)
    lp = policy(batch.input_ids, batch.attention_mask, batch.positions, batch.completion_ids,
                batch.mask)
    (lp * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum().backward()
    return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- plans


def test_pack_bins_hold_every_sequence_once_within_capacity():
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randrange(1, 30) for _ in range(rng.randrange(1, 40))]
        cap = max(lengths) + rng.randrange(0, 10)
        bins = pack_bins(lengths, cap)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= cap for b in bins)
    assert pack_bins([5, 3, 2, 4], 5) == [[0], [3], [1, 2]]  # FFD by hand
    with pytest.raises(ValueError, match="does not fit"):
        pack_bins([6], 5)


def test_packed_plan_covers_every_row_once_in_whole_groups_within_budget():
    rng = random.Random(1)
    k = 4
    for _ in range(40):
        lengths = [rng.randrange(3, 40) for _ in range(k * rng.randrange(1, 12))]
        budget = rng.choice([0, 60, 100, 200, 10_000])
        plan = plan_packed_microbatches(lengths, k, budget)
        assert sorted(r for m in plan for r in m) == list(range(len(lengths)))
        for m in plan:
            whole = {r // k for r in m if sum(1 for q in m if q // k == r // k) == k}
            if budget > 0 and whole:  # a micro-batch of whole groups stays within budget
                assert packed_tokens([lengths[r] for r in m]) <= budget or len(whole) == 1


def test_packed_plan_balances_micro_batches_and_ranks():
    k, lengths = 2, [30, 30, 5, 5, 20, 20, 15, 15, 10, 10, 12, 12]
    plan = plan_packed_microbatches(lengths, k, 80)
    loads = [sum(lengths[r] for r in m) for m in plan]
    assert sum(loads) == sum(lengths) and max(loads) - min(loads) <= 20
    ranks = [packed_rank_rows(lengths, k, r, 2) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(range(len(lengths)))
    assert abs(sum(lengths[i] for i in ranks[0]) - sum(lengths[i] for i in ranks[1])) <= 10


def test_pack_sequences_layout_and_refuses_left_padding():
    batch = collate(random_groups(0))
    packed = pack_sequences(batch.input_ids, batch.attention_mask)
    assert packed.input_ids.shape[1] == max(batch.lengths)
    assert packed.input_ids.shape[0] < len(batch.lengths)  # rows were shared
    for i, n in enumerate(batch.lengths):
        p, o = int(packed.bins[i]), int(packed.offsets[i])
        assert torch.equal(packed.input_ids[p, o:o + n], batch.input_ids[i, :n])
        assert packed.position_ids[p, o:o + n].tolist() == list(range(n))
    left = torch.tensor([[0, 1, 1]])
    with pytest.raises(ValueError, match="right-padded"):
        pack_sequences(torch.ones((1, 3), dtype=torch.long), left)


# ---------------------------------------------------------------- log-probs


@pytest.mark.parametrize("make_model", [lambda: build_model(seed=0, **SMALL).float(), qwen2_gqa],
                         ids=["tiny", "qwen2-gqa"])
def test_packed_logprobs_and_gradients_equal_the_padded_path(make_model):
    model = make_model()
    batch = collate(random_groups(2, n_groups=4))
    lp_pad, g_pad = logprobs_and_grads(model, batch, packing=False)
    lp_pack, g_pack = logprobs_and_grads(model, batch, packing=True)
    assert pack_sequences(batch.input_ids, batch.attention_mask).input_ids.shape[0] < 16
    torch.testing.assert_close(lp_pack, lp_pad, rtol=1e-5, atol=1e-5)
    assert lp_pad[batch.mask.bool()].abs().min() > 0  # real log-probs compared
    for name in g_pad:
        torch.testing.assert_close(g_pack[name], g_pad[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_sequence_never_attends_to_its_row_mate():
    model = qwen2_gqa()
    batch = collate(random_groups(4, n_groups=2))
    packed = pack_sequences(batch.input_ids, batch.attention_mask)
    mates = [(i, j) for i in range(len(batch.lengths)) for j in range(len(batch.lengths))
             if i != j and packed.bins[i] == packed.bins[j] and packed.offsets[i] < packed.offsets[j]]
    first, second = mates[0]  # `first` comes before `second` in one packed row
    policy = PolicyLogprobs(model, 1.0, packing=True)
    with torch.no_grad():
        before = policy(batch.input_ids, batch.attention_mask, batch.positions,
                        batch.completion_ids, batch.mask)
        changed = batch.input_ids.clone()
        n = batch.lengths[first]
        changed[first, :n] = (changed[first, :n] + 7) % 40
        after = policy(changed, batch.attention_mask, batch.positions, batch.completion_ids,
                       batch.mask)
    assert not torch.allclose(after[first], before[first])  # the change is seen...
    assert torch.equal(after[second], before[second])  # ...but not by the row-mate after it


def test_trainer_update_with_packing_equals_padded(tmp_path):
    model_dir = init_model_dir(tmp_path / "model", seed=0, **SMALL)
    groups = random_groups(5, n_groups=6)
    out = {}
    for packing, budget in ((False, 0), (True, 0), (True, 60)):
        cfg = load_config(overrides=["learner.lr=1e-3", "algo.group_size=4", "run.seed=0",
                                     "learner.device=cpu", "learner.record_replay=off",
                                     f"learner.packing={str(packing).lower()}",
                                     f"learner.micro_batch_tokens={budget}"])
        trainer = Trainer(cfg, model_dir)
        metrics = trainer.update(groups)
        out[(packing, budget)] = (metrics, {k: v.clone() for k, v in trainer.model.state_dict().items()})
    base_m, base_w = out[(False, 0)]
    for key in ((True, 0), (True, 60)):
        m, w = out[key]
        assert m["grad/norm"] == pytest.approx(base_m["grad/norm"], rel=1e-4)
        assert m["loss/total"] == pytest.approx(base_m["loss/total"], rel=1e-4, abs=1e-7)
        for name in base_w:
            torch.testing.assert_close(w[name], base_w[name], rtol=1e-4, atol=1e-6)
    assert out[(True, 60)][0]["batch/microbatches"] > 1
    assert out[(True, 0)][0]["batch/padded_tokens"] < base_m["batch/padded_tokens"]


def test_keeping_the_head_activations_gives_the_recomputed_gradients():
    model = qwen2_gqa()
    batch = collate(random_groups(6, n_groups=2))
    grads = []
    for keep in (0, 2**40):  # always recompute, never recompute
        model.zero_grad(set_to_none=True)
        policy = PolicyLogprobs(model, 0.9, chunk_tokens=4)
        policy.keep_logits_bytes = keep
        lp = policy(batch.input_ids, batch.attention_mask, batch.positions, batch.completion_ids,
                    batch.mask)
        lp.sum().backward()
        grads.append((lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    for name in grads[0][1]:
        torch.testing.assert_close(grads[0][1][name], grads[1][1][name], rtol=1e-6, atol=1e-7)
