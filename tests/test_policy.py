"""Tests of rapid_async.learner.policy: collation of whole groups and token log-probs."""

from __future__ import annotations

import pytest
import torch

from rapid_async.learner.policy import (collate, plan_microbatches, rank_rows, splits_groups,
                                        token_logprobs)
from rapid_async.wire.protocol import RolloutGroup
from rapid_async.tinymodel import build_model


def make_group(prompt, completions, rewards, version=0, prompt_id="p", junk=77):
    """A RolloutGroup from lists; padding beyond each length is `junk`, which
    collate must ignore. Behaviour log-probs are -(token id) / 100."""
    k = len(completions)
    t = max(1, max(len(c) for c in completions))
    ids = torch.full((k, t), junk, dtype=torch.int32)
    lps = torch.full((k, t), -9.0, dtype=torch.float32)
    for i, c in enumerate(completions):
        ids[i, :len(c)] = torch.tensor(c, dtype=torch.int32)
        lps[i, :len(c)] = -torch.tensor(c, dtype=torch.float32) / 100
    return RolloutGroup(
        actor_id="a0", prompt_id=prompt_id, policy_version=version,
        prompt_ids=torch.tensor(prompt, dtype=torch.int32), completion_ids=ids,
        completion_lengths=torch.tensor([len(c) for c in completions], dtype=torch.int32),
        logprobs=lps, rewards=torch.tensor(rewards, dtype=torch.float32),
        finish_reasons=["stop"] * len(completions),
        gen_seconds=0.1, created_at=0.0, info={})


@pytest.fixture
def groups():
    # Group 0: prompt of 3 tokens; completions of 3 and 1 tokens.
    # Group 1: prompt of 2 tokens; completions of 4 and 0 tokens.
    return [make_group([1, 5, 6], [[7, 8, 9], [10]], [1.0, 0.0], version=3, prompt_id="a"),
            make_group([1, 11], [[12, 13, 14, 15], []], [0.5, 0.25], version=5, prompt_id="b")]


def test_collate_by_hand(groups):
    batch = collate(groups, pad_id=2)
    # L = max(3 + 3, 3 + 1, 2 + 4, 2 + 0) = 6; T = 4.
    assert batch.group_size == 2
    assert batch.input_ids.tolist() == [
        [1, 5, 6, 7, 8, 9],
        [1, 5, 6, 10, 2, 2],
        [1, 11, 12, 13, 14, 15],
        [1, 11, 2, 2, 2, 2],
    ]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0, 0],
    ]
    # The logit at prompt_len - 1 + t predicts completion token t.
    assert batch.positions.tolist() == [[2, 3, 4, 0], [2, 0, 0, 0], [1, 2, 3, 4], [0, 0, 0, 0]]
    assert batch.completion_ids.tolist() == [[7, 8, 9, 0], [10, 0, 0, 0],
                                             [12, 13, 14, 15], [0, 0, 0, 0]]
    assert batch.mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert batch.mask.dtype == torch.float32
    expected_blp = -batch.completion_ids.float() / 100  # 0 on padding, not the -9 junk
    assert torch.equal(batch.behaviour_logprobs, expected_blp)
    assert batch.rewards.tolist() == [1.0, 0.0, 0.5, 0.25]
    assert batch.policy_versions.tolist() == [3, 3, 5, 5]
    for name in ("input_ids", "attention_mask", "positions", "completion_ids", "policy_versions"):
        assert getattr(batch, name).dtype == torch.long, name


def test_collate_rejects_mixed_group_sizes_and_empty_input():
    g2 = make_group([1, 5], [[7], [8]], [0.0, 1.0])
    g3 = make_group([1, 5], [[7], [8], [9]], [0.0, 1.0, 1.0], prompt_id="three")
    with pytest.raises(ValueError, match="three"):
        collate([g2, g3])
    with pytest.raises(ValueError, match="at least one group"):
        collate([])


def test_batch_to_keeps_every_field(groups):
    batch = collate(groups)
    moved = batch.to("cpu")
    assert moved.group_size == batch.group_size
    assert torch.equal(moved.positions, batch.positions)


def test_select_trims_rows_to_their_own_lengths(groups):
    batch = collate(groups, pad_id=2)
    assert batch.lengths == [6, 4, 6, 2]
    sub = batch.select([1, 3])
    # Rows 1 and 3: longest sequence 4, longest completion 1.
    assert sub.input_ids.tolist() == [[1, 5, 6, 10], [1, 11, 2, 2]]
    assert sub.positions.tolist() == [[2], [0]] and sub.mask.tolist() == [[1], [0]]
    assert sub.rewards.tolist() == [0.0, 0.25] and sub.policy_versions.tolist() == [3, 5]
    assert sub.group_size == 2
    again = batch.select([0, 1, 2, 3])
    assert all(torch.equal(getattr(again, k), getattr(batch, k)) for k in ("input_ids", "mask"))


def test_plan_microbatches_by_hand():
    # K = 2; group lengths (longest row): g0 5, g1 9, g2 3, g3 4.
    lengths = [5, 4, 9, 2, 3, 3, 1, 4]
    # Longest first: g1 (rows 2, 3) then g0, g3, g2. Budget 20: g1 alone is 2 x 9 = 18;
    # g0 + g3 + g2 = 6 rows x 5 = 30 > 20 -> g0 + g3 = 4 x 5 = 20, then g2.
    assert plan_microbatches(lengths, 2, 20) == [[2, 3], [0, 1, 6, 7], [4, 5]]
    assert plan_microbatches(lengths, 2, 0) == [[2, 3, 0, 1, 6, 7, 4, 5]]
    # Budget 12: g1 (18) is over budget on its own -> split into rows of 9.
    plan = plan_microbatches(lengths, 2, 12)
    assert plan == [[2], [3], [0, 1], [6, 7], [4, 5]]
    assert splits_groups(plan, 2) and not splits_groups(plan_microbatches(lengths, 2, 20), 2)
    for budget in (0, 1, 7, 12, 20, 100):
        rows = sorted(r for mb in plan_microbatches(lengths, 2, budget) for r in mb)
        assert rows == list(range(8))


def test_rank_rows_deal_whole_groups():
    lengths = [5, 4, 9, 2, 3, 3, 1, 4, 7, 7]  # K = 2, group longest: 5, 9, 3, 4, 7
    # Longest first: g1, g4, g0, g3, g2 -> rank 0: g1, g0, g2; rank 1: g4, g3.
    assert rank_rows(lengths, 2, 0, 2) == [0, 1, 2, 3, 4, 5]
    assert rank_rows(lengths, 2, 1, 2) == [6, 7, 8, 9]
    assert rank_rows(lengths, 2, 0, 1) == list(range(10))
    assert rank_rows(lengths[:2], 2, 1, 2) == []


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(seed=1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2)


def naive_logprobs(model, groups, temperature):
    """Per-row loop: forward each unpadded sequence alone, read the tempered
    log-prob of each completion token. Returns a list of per-row lists."""
    rows = []
    for g in groups:
        prompt = g.prompt_ids.tolist()
        for i in range(g.completion_ids.shape[0]):
            n = int(g.completion_lengths[i])
            completion = g.completion_ids[i, :n].tolist()
            ids = torch.tensor([prompt + completion])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0].double()  # (L, V)
            row = []
            for t, tok in enumerate(completion):
                logp = torch.log_softmax(logits[len(prompt) - 1 + t] / temperature, dim=-1)
                row.append(float(logp[tok]))
            rows.append(row)
    return rows


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_a_naive_loop(model, groups, temperature):
    batch = collate(groups, pad_id=0)
    with torch.no_grad():
        lp = token_logprobs(model, batch, temperature)  # (B, T)
    assert lp.shape == batch.mask.shape and lp.dtype == torch.float32
    for r, row in enumerate(naive_logprobs(model, groups, temperature)):
        n = len(row)
        assert torch.allclose(lp[r, :n].double(), torch.tensor(row, dtype=torch.float64),
                              atol=1e-5, rtol=0), f"row {r}"
        assert (lp[r, n:] == 0).all(), f"row {r}: padding is not exactly 0"
    assert (lp[batch.mask == 1] < 0).all()


def test_temperature_changes_the_logprobs(model, groups):
    batch = collate(groups)
    with torch.no_grad():
        hot = token_logprobs(model, batch, 1.0)
        cold = token_logprobs(model, batch, 0.7)
    assert (hot - cold)[batch.mask == 1].abs().max() > 1e-3


def test_pad_id_does_not_change_the_logprobs(model, groups):
    with torch.no_grad():
        a = token_logprobs(model, collate(groups, pad_id=0), 1.0)
        b = token_logprobs(model, collate(groups, pad_id=9), 1.0)
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_gradients_flow_through_real_tokens_only(model, groups):
    batch = collate(groups)
    model.zero_grad(set_to_none=True)
    lp = token_logprobs(model, batch, 0.7)
    assert lp.requires_grad
    lp.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # A loss on padding positions alone has no gradient.
    model.zero_grad(set_to_none=True)
    lp = token_logprobs(model, batch, 0.7)
    (lp * (1 - batch.mask)).sum().backward()
    assert all(float(p.grad.abs().sum()) == 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- no full logits


def full_logits_logprobs(model, batch, temperature):
    """The former implementation: (B, L, V) logits, (B, T, V) fp32 gather and log_softmax."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    idx = batch.positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])  # (B, T, V)
    logp = torch.log_softmax(torch.gather(logits, 1, idx).float() / temperature, dim=-1)
    return torch.gather(logp, 2, batch.completion_ids.unsqueeze(-1)).squeeze(-1) * batch.mask


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_logprobs_and_gradients_equal_the_full_logits_path(model, groups, chunk):
    batch = collate(groups)
    model.zero_grad(set_to_none=True)
    new = token_logprobs(model, batch, 0.7, chunk_tokens=chunk)
    (new * torch.linspace(-1, 1, new.numel()).view_as(new)).sum().backward()
    new_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    old = full_logits_logprobs(model, batch, 0.7)
    (old * torch.linspace(-1, 1, old.numel()).view_as(old)).sum().backward()
    torch.testing.assert_close(new, old, atol=1e-5, rtol=0)
    for p, g in zip(model.parameters(), new_grads):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)
    model.zero_grad(set_to_none=True)


class LogitSizedTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every newly allocated op output (views are not allocations) shaped like
    logits, last dimension V, with more than `limit` rows of V (the (H, V)
    transpose of the tied weight is exempt)."""

    def __init__(self, vocab: int, hidden: int, limit: int):
        super().__init__()
        self.vocab, self.hidden, self.limit, self.seen = vocab, hidden, limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves(
            (args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs \
                    and t.dim() >= 1 \
                    and t.shape[-1] == self.vocab \
                    and tuple(t.shape) != (self.hidden, self.vocab) \
                    and t.numel() > self.limit * self.vocab:
                self.seen.append((str(func), tuple(t.shape)))
        return out


def test_no_vocabulary_sized_tensor_beyond_one_chunk_forward_and_backward(groups, monkeypatch):
    # vocab 32 and hidden 48 differ from every other size here (L = 6, T = 4, B = 4).
    # Logits of any size count as large here: the chunks are recomputed in the backward.
    monkeypatch.setattr("rapid_async.learner.policy.KEEP_LOGITS_BYTES", 0)
    model = build_model(seed=2, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2)
    vocab = model.config.vocab_size
    batch = collate(groups)
    assert batch.input_ids.shape[0] * batch.input_ids.shape[1] > 2  # a (B, L, V) would be caught
    calls = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda mod, inputs, out: calls.append(tuple(inputs[0].shape)))
    with LogitSizedTensors(vocab, 48, limit=2) as mode:
        token_logprobs(model, batch, 1.0, chunk_tokens=2).sum().backward()
    hook.remove()
    assert mode.seen == []
    # lm_head sees (n <= chunk, H) hidden states only: 8 completion tokens -> 4 chunks,
    # each computed in the forward and again in the backward (checkpointed).
    assert calls and all(len(c) == 2 and c[0] <= 2 for c in calls) and len(calls) == 8
    # The detector does catch the former implementation's (B, L, V) logits.
    with LogitSizedTensors(vocab, 48, limit=2) as mode:
        full_logits_logprobs(model, batch, 1.0).sum().backward()
    assert any(shape[:2] == tuple(batch.input_ids.shape) for _, shape in mode.seen)


def test_save_and_load_batch_round_trip(groups, tmp_path):
    from rapid_async.learner.policy import load_batch, save_batch

    batch = collate(groups, pad_id=2)
    save_batch(batch, tmp_path / "b.safetensors")
    again = load_batch(tmp_path / "b.safetensors")
    assert again.group_size == 2
    for name, value in batch.__dict__.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(getattr(again, name), value) and getattr(again, name).dtype == value.dtype
