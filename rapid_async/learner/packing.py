"""Sequence packing for the learner's forward pass (`learner.packing`).

Used by `policy.PolicyLogprobs` (the layout of one micro-batch) and by the
`Trainer` (micro-batch and rank plans by real tokens). A padded micro-batch
runs rows x longest row tokens through the model; a packed one puts whole
sequences one after another into rows of at most `capacity` tokens
(first-fit decreasing; capacity = the longest sequence, so no row gets longer
than in the padded layout and attention costs no more per row), with position
ids restarting at 0 for every sequence. transformers reads the restarting
position ids as packed sequences (no attention mask given) and builds a
block-diagonal causal mask for SDPA / eager on CPU, or passes the sequence
boundaries to flash-attention's varlen kernel (flash_attention_2, where
installed): a token never attends to another sequence, so every log-prob
equals the padded path's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def pack_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: sequence indices per packed row, each row's total <= capacity.

    Args:
        lengths: tokens of each sequence (every one <= capacity).
        capacity: tokens per packed row.

    Returns:
        Rows of sequence indices; together they hold every index exactly once.

    Raises:
        ValueError: if a sequence is longer than capacity.
    """
    if lengths and max(lengths) > capacity:
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit packed rows of {capacity}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


@dataclass
class Packed:
    """One micro-batch in packed rows.

    Attributes:
        input_ids: (P, C) the sequences' tokens one after another, 0 after the last.
        position_ids: (P, C) 0, 1, ... restarting at every sequence (and on the tail padding).
        bins: (B,) packed row of each original row.
        offsets: (B,) column where each original row starts in its packed row.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    bins: torch.Tensor
    offsets: torch.Tensor


def pack_sequences(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Packed:
    """Pack right-padded (B, L) rows (real tokens a prefix of each row) into rows of L tokens.

    Raises:
        ValueError: if a row's real tokens are not a prefix (left padding, holes).
    """
    lengths_t = attention_mask.sum(dim=1)  # (B,)
    width = input_ids.shape[1]
    prefix = torch.arange(width, device=attention_mask.device)[None, :] < lengths_t[:, None]  # (B, L)
    if not torch.equal(prefix, attention_mask.bool()):
        raise ValueError("packing needs right-padded rows (real tokens first, then padding)")
    lengths = lengths_t.tolist()
    capacity = max(1, max(lengths))
    rows = pack_bins(lengths, capacity)
    b = len(lengths)
    bins, offsets = [0] * b, [0] * b
    seq_ids, pos_ids = [], []
    for p, members in enumerate(rows):
        start = 0
        for i in members:
            bins[i], offsets[i] = p, start
            start += lengths[i]
        seq_ids.append(torch.cat([input_ids[i, :lengths[i]] for i in members]
                                 + [input_ids.new_zeros(capacity - start)]))
        pos_ids.append(torch.cat([torch.arange(lengths[i]) for i in members]
                                 + [torch.arange(capacity - start)]))
    device = input_ids.device
    return Packed(torch.stack(seq_ids), torch.stack(pos_ids).to(device),
                  torch.tensor(bins, device=device), torch.tensor(offsets, device=device))


def packed_tokens(lengths: list[int]) -> int:
    """Tokens the packed layout of sequences of these lengths runs (rows x capacity)."""
    if not lengths:
        return 0
    return len(pack_bins(lengths, max(lengths))) * max(lengths)


# ---------------------------------------------------------------- plans by real tokens


def _group_tokens(lengths: list[int], group_size: int) -> list[int]:
    return [sum(lengths[g * group_size:(g + 1) * group_size]) for g in range(len(lengths) // group_size)]


def balance(weights: list[int], n: int) -> list[list[int]]:
    """Longest-processing-time: item indices into n lists of similar total weight.

    Items are taken heaviest first (ties by index) and each goes to the list
    with the least total so far (ties: the lowest list), so the result is the
    same on every learner rank. Each list keeps its items in index order.
    """
    out: list[list[int]] = [[] for _ in range(n)]
    load = [0] * n
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        j = min(range(n), key=lambda j: (load[j], j))
        out[j].append(i)
        load[j] += weights[i]
    return [sorted(items) for items in out]


def packed_rank_rows(lengths: list[int], group_size: int, rank: int, world: int) -> list[int]:
    """The rows of the whole groups learner rank `rank` of `world` trains on,
    balanced by real tokens (not by longest row)."""
    groups = balance(_group_tokens(lengths, group_size), world)[rank]
    return [g * group_size + i for g in groups for i in range(group_size)]


def plan_packed_microbatches(lengths: list[int], group_size: int, budget: int) -> list[list[int]]:
    """Micro-batches of whole groups with similar real tokens, each within `budget`
    packed tokens where a group fits at all (a group over it alone is split by rows).

    Args:
        lengths: prompt + completion tokens of each row, whole groups in group-major order.
        group_size: K.
        budget: packed tokens (rows x capacity of `pack_bins`) per micro-batch; <= 0: one.

    Returns:
        Lists of row indices; together they hold every row exactly once.
    """
    n_groups = len(lengths) // group_size
    all_rows = list(range(n_groups * group_size))
    if budget <= 0 or n_groups == 0 or packed_tokens(lengths) <= budget:
        return [all_rows] if all_rows else []
    weights = _group_tokens(lengths, group_size)
    rows_of = [list(range(g * group_size, (g + 1) * group_size)) for g in range(n_groups)]
    big = [g for g in range(n_groups) if packed_tokens([lengths[r] for r in rows_of[g]]) > budget]
    plan: list[list[int]] = []
    for g in big:  # alone over budget: split its rows, each part under budget
        part: list[int] = []
        for r in rows_of[g]:
            if part and packed_tokens([lengths[i] for i in part + [r]]) > budget:
                plan.append(part)
                part = []
            part.append(r)
        plan.append(part)
    rest = [g for g in range(n_groups) if g not in big]
    n = max(1, -(-sum(weights[g] for g in rest) // budget))
    while rest:
        parts = balance([weights[g] for g in rest], n)
        micro = [[r for j in part for r in rows_of[rest[j]]] for part in parts if part]
        if all(packed_tokens([lengths[r] for r in m]) <= budget for m in micro) or n >= len(rest):
            return plan + micro
        n += 1
    return plan
