"""Digests that prove an actor holds exactly the learner's weights.

Used by the learner's publisher (digests of each published version, on the
training device) and by the actor's receiver (digests of what it would hold
after an update, on its device, before its engine sees the update).

Per-tensor linear digest. For a tensor with integer bit patterns x_0..x_{n-1}
(the inference dtype viewed as same-width signed integers, sign-extended to
64 bits) the digest is

    D(x) = sum_i a_i * x_i   (mod 2^64),   a_i = A[i mod 2^16] * B[i div 2^16]

with fixed pseudo-random odd 64-bit tables A and B (splitmix64 of fixed
seeds), so every a_i is odd. Properties used here:

- Any change confined to one element (e.g. a single flipped bit, which changes
  x_i by +-2^b, b < 32) changes D: a_i * delta is odd * nonzero with
  |delta| < 2^32, never 0 mod 2^64. Changes to several elements collide only
  by accident (the a_i are unrelated), as for any 64-bit checksum.
- It is linear, so an update that changes elements S costs O(|S|) to check:
  D(new) = D(old) + sum_{i in S} a_i * (new_i - old_i). The receiver computes
  this from the changes it decoded and the values it holds; the publisher
  computes D(new) from the full tensor, independently of the change it encoded.
- It runs where the tensors live: on CUDA as tensor ops (one multiply and two
  sums per element in chunks, in wrapping int64 arithmetic), on the CPU as
  fused numba loops (kernels.py) that give the same numbers in one pass, with
  the finiteness check of the same values folded in. Without numba the CPU
  uses the tensor ops too.

It is an integrity check, not a cryptographic one: a full sha256 covers the
bytes of every snapshot. `certificate` binds the digests to the update's
version, base version, kind, dtype and layout, so a header that was corrupted
or sent for another version fails the check.
"""

from __future__ import annotations

import functools
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import msgpack
import numpy as np
import torch

from rapid_async.weights.layout import Layout

_LOW_BITS = 16
_ROW = 1 << _LOW_BITS
_CHUNK_ROWS = {"cpu": 16, "cuda": 512}
_TABLES: dict[tuple[str, int], torch.Tensor] = {}
EXPONENT_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00, torch.float32: 0x7F80_0000}
"""Per inference dtype: the exponent bits, all set exactly in inf and NaN patterns."""


@functools.cache
def _kernels() -> ModuleType | None:
    """rapid_async.weights.kernels, or None where numba is not installed."""
    try:
        from rapid_async.weights import kernels
    except ImportError:
        return None
    return kernels


def _fused(t: torch.Tensor) -> ModuleType | None:
    """The kernels module if `t` is on the CPU and numba is there, else None."""
    return _kernels() if t.device.type == "cpu" else None


_THREADS = max(1, min(4, os.cpu_count() or 1))
_SPLIT_MIN = 1 << 20
"""`check_changes` splits k >= _SPLIT_MIN changes over _THREADS threads."""


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_THREADS, thread_name_prefix="weights-digest")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


_NP_INT = {torch.int16: np.int16, torch.int32: np.int32}


def _mask(layout: Layout) -> np.integer:
    """EXPONENT_BITS of the layout's dtype as a numpy scalar of its integer width."""
    return _NP_INT[layout.int_dtype](EXPONENT_BITS[layout.torch_dtype])


def warm(layout: Layout) -> None:
    """Compile or load the CPU kernels for this layout's width now, not on first use."""
    kernels = _kernels()
    if kernels is not None:
        kernels.warm(np.dtype(_NP_INT[layout.int_dtype]))


def _splitmix64(seed: int, n: int) -> np.ndarray:
    """n odd pseudo-random 64-bit integers (splitmix64 of seed, seed+1, ...)."""
    with np.errstate(over="ignore"):
        z = (np.arange(n, dtype=np.uint64) + np.uint64(seed)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z | np.uint64(1)).view(np.int64)


def _table(which: int, n: int, device: torch.device) -> torch.Tensor:
    """The first n entries of table A (which=0) or B (which=1) on `device`."""
    key = (str(device), which)
    table = _TABLES.get(key)
    if table is None or table.numel() < n:
        size = max(n, _ROW if which == 0 else 64)
        table = torch.from_numpy(_splitmix64(0x5EED0000 + which * 0x1000_0000, size)).to(device)
        _TABLES[key] = table
    return table[:n]


def multipliers(local: torch.Tensor, numel: int | None = None) -> torch.Tensor:
    """a_i for int64 element positions `local` (within their tensor, < numel)."""
    if numel is None:
        numel = int(local.max()) + 1 if local.numel() else 1
    a = _table(0, _ROW, local.device)
    b = _table(1, (numel >> _LOW_BITS) + 1, local.device)
    return a[local & (_ROW - 1)] * b[local >> _LOW_BITS]


def tensor_digest(bits: torch.Tensor) -> torch.Tensor:
    """D(x) of one tensor's integer view, as a 0-d int64 tensor on its device."""
    flat = bits.reshape(-1)
    n_rows, tail = divmod(flat.numel(), _ROW)
    device = flat.device
    a = _table(0, _ROW, device)
    b = _table(1, n_rows + 1, device)
    total = torch.zeros((), dtype=torch.int64, device=device)
    step = _CHUNK_ROWS.get(device.type, 512)
    rows = flat[: n_rows * _ROW].view(n_rows, _ROW)
    for r in range(0, n_rows, step):
        block = rows[r:r + step].to(torch.int64)  # (R, 2^16), sign-extended
        block.mul_(a)
        total += (block.sum(dim=1) * b[r:r + block.shape[0]]).sum()
    if tail:
        rest = flat[n_rows * _ROW:].to(torch.int64) * a[:tail]
        total += rest.sum() * b[n_rows]
    return total


def state_digests(flat: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(len(layout),) int64 digests of every tensor of a flat buffer, on its device."""
    bits = flat.view(layout.int_dtype)
    kernels = _fused(bits)
    if kernels is not None:
        out = np.empty(len(layout), dtype=np.int64)
        b = _table(1, (max(layout.numels, default=0) >> _LOW_BITS) + 1, bits.device)
        kernels.full_sums(_np(bits), _np(layout.boundaries("cpu")), _np(_table(0, _ROW, bits.device)),
                          _np(b), out)
        return torch.from_numpy(out)
    out = torch.empty(len(layout), dtype=torch.int64, device=flat.device)
    for i, (off, n) in enumerate(zip(layout.offsets, layout.numels)):
        out[i] = tensor_digest(bits[off:off + n])
    return out


def nonfinite(bits: torch.Tensor, layout: Layout) -> int:
    """How many values of the (n,) integer view `bits` (of `layout.dtype`) are inf or NaN."""
    mask = EXPONENT_BITS[layout.torch_dtype]
    kernels = _fused(bits)
    if kernels is not None:
        return int(kernels.count_nonfinite(_np(bits), _mask(layout)))
    return int(((bits & mask) == mask).sum())


def check_changes(digests: torch.Tensor, layout: Layout, idx: torch.Tensor,
                  old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The digests after elements `idx` change from `old` to `new`, and the non-finite count.

    One pass over the changes on the CPU (kernels.py), tensor ops elsewhere.

    Args:
        digests: (len(layout),) int64, the digests before the change.
        layout: the buffer's layout.
        idx: (k,) int64 sorted unique flat positions, inside the buffer.
        old, new: (k,) integer bit patterns (layout.int_dtype) at those positions.

    Returns:
        ((len(layout),) int64 digests, a new tensor; how many `new` values
        are inf or NaN).

    Raises:
        ValueError: positions unsorted or outside the buffer (CPU path only;
            the decoder never produces them).
    """
    kernels = _fused(idx)
    if kernels is None:
        return updated_digests(digests, layout, idx, old, new), nonfinite(new, layout)
    b = _table(1, (max(layout.numels, default=0) >> _LOW_BITS) + 1, idx.device)
    tables = (_np(layout.boundaries("cpu")), _np(_table(0, _ROW, idx.device)), _np(b), _mask(layout))
    idx_np, old_np, new_np = _np(idx), _np(old), _np(new)
    parts = _THREADS if idx_np.shape[0] >= _SPLIT_MIN else 1
    cuts = [idx_np.shape[0] * i // parts for i in range(parts + 1)]
    sums = [np.zeros(len(layout), dtype=np.int64) for _ in range(parts)]

    def part(i: int) -> int:  # the kernel releases the GIL: the parts run in parallel
        s, e = cuts[i], cuts[i + 1]
        return kernels.change_sums(idx_np[s:e], old_np[s:e], new_np[s:e], *tables, sums[i],
                                   int(idx_np[s - 1]) if s else -1)

    counts = list(_pool().map(part, range(parts))) if parts > 1 else [part(0)]
    if min(counts) < 0:
        raise ValueError(f"changes name positions that are unsorted or outside the {layout.numel} elements")
    return digests + torch.from_numpy(np.sum(sums, axis=0)), sum(counts)


def updated_digests(digests: torch.Tensor, layout: Layout, idx: torch.Tensor,
                    old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The digests after elements `idx` change from `old` to `new` bit patterns, as tensor ops.

    The device-independent path of `check_changes` (used on CUDA).

    Args:
        digests: (len(layout),) int64, the digests before the change.
        layout: the buffer's layout.
        idx: (k,) int64 sorted unique flat positions.
        old, new: (k,) integer bit patterns at those positions.

    Returns:
        (len(layout),) int64 digests, a new tensor.
    """
    if idx.numel() == 0:
        return digests.clone()
    starts = layout.boundaries(idx.device)
    edges = torch.searchsorted(idx, starts)  # first change at or after each tensor start
    local = idx - torch.repeat_interleave(starts[:-1], edges.diff(), output_size=idx.numel())
    change = multipliers(local, max(layout.numels)) * (new.to(torch.int64) - old.to(torch.int64))
    csum = torch.cat([torch.zeros(1, dtype=torch.int64, device=idx.device), change.cumsum(0)])
    return digests + (csum[edges[1:]] - csum[edges[:-1]])


def as_list(digests: torch.Tensor) -> list[int]:
    """Digests as unsigned Python ints (msgpack-able, device independent)."""
    return [int(d) & 0xFFFF_FFFF_FFFF_FFFF for d in digests.cpu().tolist()]


def certificate(kind: str, version: int, base_version: int | None, dtype: str,
                layout_hash: str, digests: list[int], data_sha256: str | None) -> str:
    """The checksum carried by a WeightUpdate: binds its header to the weights.

    sha256 over (format tag, kind, version, base_version, dtype, layout hash,
    the per-tensor digests of the weights after the update, and for a
    snapshot the sha256 of its raw bytes).

    Returns:
        "sha256:<hex>".
    """
    packed = msgpack.packb(["rapid-weights/2", kind, version, base_version, dtype, layout_hash,
                            digests, data_sha256])
    return "sha256:" + hashlib.sha256(packed).hexdigest()


def state_digest(layout: Layout, digests: list[int]) -> str:
    """A short name for a state: independent of tensor order and of versions.

    Returns:
        "lin64:<hex>" over sorted (name, shape, digest) and the dtype.
    """
    rows = sorted(zip(layout.names, [list(s) for s in layout.shapes], digests))
    return "lin64:" + hashlib.sha256(msgpack.packb([layout.dtype, rows])).hexdigest()[:32]


def digest_named(tensors: dict[str, torch.Tensor], dtype: str) -> str:
    """`state_digest` of named tensors (already in `dtype`), e.g. from a checkpoint."""
    layout = Layout.from_named(tensors.items(), dtype)
    flat = layout.allocate()
    for name, view in layout.views(flat).items():
        view.copy_(tensors[name])
    return state_digest(layout, as_list(state_digests(flat, layout)))
