"""Learner-side policy evaluation: batch collation and token log-probs.

Used by the learner process. `collate` turns whole rollout groups into padded
tensors in group-major order (row b = group b // K, completion b % K), and
`token_logprobs` computes log pi_theta(y_t | x, y_<t) for every completion
token with the same temperature the actor sampled with, so that
delta = logprobs - behaviour_logprobs compares like with like. It never builds
full-vocabulary logits for the batch: the model body gives hidden states, and
only the completion positions go through `lm_head`, a chunk at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from rapid_async.learner.packing import pack_sequences


@dataclass
class Batch:
    """A learner mini-batch of G groups of K completions (B = G * K rows).

    Attributes:
        input_ids: (B, L) prompt + completion tokens, right-padded with pad_id.
        attention_mask: (B, L) 1 on real tokens.
        positions: (B, T) index in input_ids of the logit that predicts
            completion token t (prompt_len - 1 + t); 0 on padding.
        completion_ids: (B, T) completion tokens, 0 on padding.
        mask: (B, T) float, 1 on the completion tokens the model generated
            (0 on padding, and on env / tool tokens of multi-turn episodes,
            which are in the context but take no part in the loss).
        behaviour_logprobs: (B, T) the actor's log mu, 0 on padding.
        rewards: (B,) rewards (finite floats).
        policy_versions: (B,) version that generated each row.
        group_size: K.
        truncated: (B,) bool, True where the completion was cut at
            max_new_tokens (finish_reason "length").
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    completion_ids: torch.Tensor
    mask: torch.Tensor
    behaviour_logprobs: torch.Tensor
    rewards: torch.Tensor
    policy_versions: torch.Tensor
    group_size: int
    truncated: torch.Tensor | None = None

    def to(self, device: str | torch.device) -> "Batch":
        fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                  for k, v in self.__dict__.items()}
        return Batch(**fields)

    @property
    def lengths(self) -> list[int]:
        """Prompt + completion tokens of each row."""
        return self.attention_mask.sum(dim=1).tolist()

    def select(self, rows: list[int]) -> "Batch":
        """The given rows, trimmed to their own longest sequence and completion.

        Fields of shape (B, L) keep the rows' longest prompt + completion,
        fields of shape (B, T) their longest completion, (B,) fields the rows.
        """
        idx = torch.tensor(rows, dtype=torch.long)
        seq = max(1, int(self.attention_mask[idx].sum(dim=1).max()))
        tok = max(1, token_extent(self.mask[idx]))
        fields: dict[str, Any] = {}
        for name, value in self.__dict__.items():
            if isinstance(value, torch.Tensor):
                value = value[idx]
                if name in SEQUENCE_FIELDS:
                    value = value[:, :seq]
                elif name in TOKEN_FIELDS:
                    value = value[:, :tok]
            fields[name] = value
        return Batch(**fields)


def token_extent(mask: torch.Tensor) -> int:
    """Width that keeps every masked token of (B, T) `mask`: last 1 + 1 (0 if none).
    With env tokens (0) between model tokens this exceeds the row sums."""
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    return int(cols[-1]) + 1 if cols.numel() else 0


def save_batch(batch: Batch, path: str | Path) -> None:
    """Write a Batch as safetensors (tensors, and K in the metadata)."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in batch.__dict__.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, str(path), metadata={"group_size": str(batch.group_size)})


def load_batch(path: str | Path) -> Batch:
    """Read a Batch written by `save_batch`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        group_size = int(f.metadata()["group_size"])
    return Batch(**tensors, group_size=group_size)


SEQUENCE_FIELDS = ("input_ids", "attention_mask")
"""Batch fields of shape (B, L)."""
TOKEN_FIELDS = ("positions", "completion_ids", "mask", "behaviour_logprobs")
"""Batch fields of shape (B, T)."""


def collate(groups: list[Any], pad_id: int = 0) -> Batch:
    """Stack rollout groups (protocol.RolloutGroup) into one Batch.

    Raises:
        ValueError: if groups disagree on K.
    """
    if not groups:
        raise ValueError("collate needs at least one group")
    k = int(groups[0].completion_ids.shape[0])
    rows: list[tuple[list[int], list[int], list[float]]] = []
    masks: list[list[float] | None] = []
    rewards: list[float] = []
    versions: list[int] = []
    truncated: list[bool] = []
    for g in groups:
        if int(g.completion_ids.shape[0]) != k:
            raise ValueError(f"group {g.prompt_id} has {g.completion_ids.shape[0]} "
                             f"completions, expected K = {k}")
        prompt = [int(t) for t in g.prompt_ids.tolist()]
        for i in range(k):
            n = int(g.completion_lengths[i])
            rows.append((prompt, g.completion_ids[i, :n].tolist(), g.logprobs[i, :n].tolist()))
            loss_mask = getattr(g, "loss_mask", None)  # multi-turn: 0 on env tokens
            masks.append(None if loss_mask is None else loss_mask[i, :n].float().tolist())
            rewards.append(float(g.rewards[i]))
            versions.append(int(g.policy_version))
            truncated.append(g.finish_reasons[i] == "length")
    b = len(rows)
    seq_len = max(len(p) + len(c) for p, c, _ in rows)
    t_max = max(1, max(len(c) for _, c, _ in rows))
    input_ids = torch.full((b, seq_len), pad_id, dtype=torch.long)
    attention = torch.zeros((b, seq_len), dtype=torch.long)
    positions = torch.zeros((b, t_max), dtype=torch.long)
    comp = torch.zeros((b, t_max), dtype=torch.long)
    mask = torch.zeros((b, t_max), dtype=torch.float32)
    blp = torch.zeros((b, t_max), dtype=torch.float32)
    for r, (prompt, completion, lps) in enumerate(rows):
        p, c = len(prompt), len(completion)
        input_ids[r, : p + c] = torch.tensor(prompt + completion, dtype=torch.long)
        attention[r, : p + c] = 1
        if c:
            positions[r, :c] = torch.arange(p - 1, p - 1 + c)
            comp[r, :c] = torch.tensor(completion, dtype=torch.long)
            mask[r, :c] = 1.0 if masks[r] is None else torch.tensor(masks[r])
            blp[r, :c] = torch.tensor(lps, dtype=torch.float32)
    return Batch(input_ids, attention, positions, comp, mask, blp,
                 torch.tensor(rewards, dtype=torch.float32),
                 torch.tensor(versions, dtype=torch.long), k,
                 torch.tensor(truncated, dtype=torch.bool))


# ---------------------------------------------------------------- micro-batches


def plan_microbatches(lengths: list[int], group_size: int, budget: int) -> list[list[int]]:
    """Split rows into micro-batches whose padded size stays within a token budget.

    Groups are taken longest first (so that rows of similar length share a
    micro-batch) and packed greedily while rows x longest row <= budget. A
    group that alone exceeds the budget is split by rows (and a row that
    alone exceeds it goes alone).

    Args:
        lengths: prompt + completion tokens of each row, whole groups in
            group-major order.
        group_size: K.
        budget: padded tokens per micro-batch; <= 0 means no limit.

    Returns:
        Lists of row indices; together they hold every row exactly once.
    """
    n_groups = len(lengths) // group_size
    groups = [list(range(g * group_size, (g + 1) * group_size)) for g in range(n_groups)]
    groups.sort(key=lambda rows: -max(lengths[r] for r in rows))
    if budget <= 0:
        return [[r for rows in groups for r in rows]] if groups else []
    plan: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for rows in groups:
        glen = max(lengths[r] for r in rows)
        if current and (len(current) + len(rows)) * max(longest, glen) <= budget:
            current += rows
            longest = max(longest, glen)
            continue
        if current:
            plan.append(current)
        current, longest = list(rows), glen
        if len(rows) * glen > budget:  # the group alone is over budget: split its rows
            per = max(1, budget // glen)
            plan += [rows[i:i + per] for i in range(0, len(rows), per)]
            current, longest = [], 0
    if current:
        plan.append(current)
    return plan


def splits_groups(plan: list[list[int]], group_size: int) -> bool:
    """True if some micro-batch holds only part of a group."""
    for rows in plan:
        counts: dict[int, int] = {}
        for r in rows:
            counts[r // group_size] = counts.get(r // group_size, 0) + 1
        if any(c != group_size for c in counts.values()):
            return True
    return False


def rank_rows(lengths: list[int], group_size: int, rank: int, world: int) -> list[int]:
    """The rows of the whole groups that learner rank `rank` of `world` trains on.

    Groups are dealt longest first, round robin, so ranks get similar work.
    """
    n_groups = len(lengths) // group_size
    order = sorted(range(n_groups),
                   key=lambda g: -max(lengths[g * group_size:(g + 1) * group_size]))
    return [g * group_size + i for g in sorted(order[rank::world]) for i in range(group_size)]


# ---------------------------------------------------------------- log-probs


LOGPROB_CHUNK_TOKENS = 256
"""Completion tokens per lm_head chunk: one chunk's (chunk, V) logits exist at a time."""
KEEP_LOGITS_BYTES = 64 * 2**20
"""Below this many bytes of float32 (N, V) logits the backward keeps the chunks'
activations instead of recomputing each lm_head chunk (checkpointing saves
memory only where the logits are large: Qwen's 151,936-token vocabulary)."""


def token_logprobs(model: torch.nn.Module, batch: Batch, temperature: float,
                   chunk_tokens: int = LOGPROB_CHUNK_TOKENS, packing: bool = False) -> torch.Tensor:
    """log pi_theta of each completion token under the tempered distribution.

    Runs the model body once, takes the hidden states at the N completion
    positions only, and computes the N sampled tokens' log-probs through
    `lm_head` in chunks of `chunk_tokens`: no (B, L, V) or (B, T, V) tensor
    exists, only one (chunk, V) block at a time. With gradients on and (N, V)
    float32 logits over `KEEP_LOGITS_BYTES`, each chunk is recomputed in the
    backward pass (activation checkpointing), so the autograd graph holds
    (N, H) hidden states, not (N, V) logits; below it nothing is recomputed.

    Args:
        model: a Hugging Face causal LM (`get_decoder()` the body, returning
            `last_hidden_state`; `get_output_embeddings()` the lm_head).
        batch: the collated mini-batch (or micro-batch).
        temperature: sampling temperature used by the actor.
        chunk_tokens: completion tokens per lm_head call.
        packing: packed rows of whole sequences (see `PolicyLogprobs`).

    Returns:
        (B, T) float32 log-probs, 0 where batch.mask is 0. Differentiable.
    """
    return PolicyLogprobs(model, temperature, chunk_tokens, packing)(
        batch.input_ids, batch.attention_mask, batch.positions, batch.completion_ids, batch.mask)


class PolicyLogprobs(torch.nn.Module):
    """A causal LM whose forward returns the token log-probs of a batch.

    The learner calls the model through this wrapper so that one module's
    forward covers body and lm_head: FSDP2 (`fully_shard` on the wrapper as
    root) then gathers the embedding and lm_head around it.

    Args:
        model: a Hugging Face causal LM.
        temperature: sampling temperature used by the actor.
        chunk_tokens: completion tokens per lm_head call.
        packing: run the body on packed rows of whole sequences (`pack_sequences`)
            instead of the padded rows; same log-probs, fewer padding tokens.
    """

    def __init__(self, model: torch.nn.Module, temperature: float,
                 chunk_tokens: int = LOGPROB_CHUNK_TOKENS, packing: bool = False):
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.chunk_tokens = chunk_tokens
        self.packing = packing
        self.keep_logits_bytes = KEEP_LOGITS_BYTES

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                positions: torch.Tensor, completion_ids: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """(B, T) float32 log-probs from the Batch fields of the same names."""
        model = self.model
        rows, cols = mask.nonzero(as_tuple=True)  # (N,), (N,)
        if self.packing:
            packed = pack_sequences(input_ids, attention_mask)
            hidden = model.get_decoder()(input_ids=packed.input_ids, position_ids=packed.position_ids,
                                         use_cache=False).last_hidden_state  # (P, C, H)
            h = hidden[packed.bins[rows], packed.offsets[rows] + positions[rows, cols]]  # (N, H)
        else:
            hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                         use_cache=False).last_hidden_state  # (B, L, H)
            h = hidden[rows, positions[rows, cols]]  # (N, H)
        targets = completion_ids[rows, cols]  # (N,)
        head = model.get_output_embeddings()
        cap = getattr(model.config, "final_logit_softcapping", None)
        pieces = []
        recompute = (torch.is_grad_enabled() and h.requires_grad
                     and h.shape[0] * head.weight.shape[0] * 4 > self.keep_logits_bytes)
        for i in range(0, h.shape[0], self.chunk_tokens):
            args = (head, h[i:i + self.chunk_tokens], targets[i:i + self.chunk_tokens],
                    self.temperature, cap)
            if recompute:
                pieces.append(checkpoint(chunk_logprobs, *args, use_reentrant=False))
            else:
                pieces.append(chunk_logprobs(*args))
        flat = torch.cat(pieces) if pieces else h.new_zeros(0, dtype=torch.float32)  # (N,)
        out = torch.zeros(mask.shape, dtype=torch.float32, device=flat.device)  # (B, T)
        return out.index_put((rows, cols), flat)


def chunk_logprobs(head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor,
                   temperature: float, softcap: float | None = None) -> torch.Tensor:
    """Tempered log-softmax of lm_head(h), read at the target tokens.

    Args:
        head: the lm_head (H -> V).
        h: (n, H) hidden states.
        targets: (n,) token ids.
        temperature: divides the logits.
        softcap: the model's final logit soft-capping (Gemma), or None.

    Returns:
        (n,) float32 log-probs.
    """
    logits = head(h).float()  # (n, V)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)  # (n,)
    return picked - torch.logsumexp(logits, dim=-1)  # (n,)
