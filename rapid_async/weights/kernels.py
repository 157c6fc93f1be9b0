"""Fused CPU loops for the weight digests (numba): one pass where tensor ops take ten.

Used by `digest.py` in both processes when the tensors are on the CPU: the
actor's receiver (a delta's changes, a snapshot's values, the buffer it wrote)
and the learner's publisher when it trains on the CPU. On CUDA, and where numba
is not installed, digest.py computes the same numbers with tensor ops;
tests/test_weights_digest.py checks both paths against the definition.

Measured at Qwen2.5-0.5B's shape on the 2-core dev box (bf16, 20.7M changed
elements of 494M): the tensor ops spent 0.75 s on the digests of a delta's
changes and 0.04 s on their finiteness, in about fifteen passes over
(k,) int64 temporaries; `change_sums` does both in one pass in 0.04 s.
A full digest of the 494M elements takes 0.18 s instead of 0.67 s, and the
finiteness of a snapshot 0.03 s instead of 1.06 s (`torch.isfinite` on bf16).

The arithmetic is digest.py's: for element l of a tensor with integer bit
pattern x (sign-extended), a_l = A[l & 0xFFFF] * B[l >> 16], and all products
and sums wrap modulo 2^64 (numba's int64 arithmetic wraps, as C's does). A
value is non-finite when every exponent bit of its pattern is set (`mask`).
The functions are compiled on first use, cached on disk and release the GIL.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def change_sums(idx, old, new, starts, a, b, mask, out, prev):  # pragma: no cover - compiled
    """Add each tensor's digest change to `out`; count non-finite new values.

    Args:
        idx: (k,) int64 sorted flat positions of the changed elements (one
            contiguous part of a delta's when the work is split over threads).
        old, new: (k,) integer bit patterns before and after (same dtype).
        starts: (T + 1,) int64 start offset of every tensor, then the total.
        a, b: the int64 tables A (2^16 entries) and B (enough for the
            largest tensor).
        mask: the exponent bits, in the dtype of `new`.
        out: (T,) int64; out[t] += sum over changes in tensor t of
            a_l * (new - old).
        prev: the position before idx[0] (-1 for the first part).

    Returns:
        The number of non-finite new values, or -1 if a position lies
        outside [0, starts[-1]) or `idx` is not sorted (out is then partial).
    """
    last = starts.shape[0] - 2
    end = starts[last + 1]
    t = 0
    nonfinite = 0
    for j in range(idx.shape[0]):
        i = idx[j]
        if i <= prev or i >= end:
            return -1
        prev = i
        while t < last and i >= starts[t + 1]:
            t += 1
        local = i - starts[t]
        x = new[j]
        if (x & mask) == mask:
            nonfinite += 1
        out[t] += a[local & 0xFFFF] * b[local >> 16] * (np.int64(x) - np.int64(old[j]))
    return nonfinite


@numba.njit(cache=True, nogil=True)
def full_sums(bits, starts, a, b, out):  # pragma: no cover - compiled
    """out[t] = the digest of tensor t of a flat integer view.

    Args:
        bits: (n,) integer bit patterns of the flat buffer.
        starts: (T + 1,) int64 start offsets, then n.
        a, b: the tables A and B (as in `change_sums`).
        out: (T,) int64, overwritten.
    """
    for t in range(starts.shape[0] - 1):
        total = np.int64(0)
        row = 0
        for r0 in range(starts[t], starts[t + 1], 65536):
            acc = np.int64(0)
            for l in range(min(65536, starts[t + 1] - r0)):
                acc += a[l] * np.int64(bits[r0 + l])
            total += acc * b[row]
            row += 1
        out[t] = total


@numba.njit(cache=True, nogil=True)
def count_nonfinite(bits, mask):  # pragma: no cover - compiled
    """How many of the (n,) bit patterns `bits` have every bit of `mask` set."""
    count = 0
    for i in range(bits.shape[0]):
        if (bits[i] & mask) == mask:
            count += 1
    return count


def warm(int_dtype: np.dtype) -> None:
    """Compile (or load from the disk cache) every function for one integer width."""
    bits = np.zeros(3, dtype=int_dtype)
    starts = np.array([0, 1, 3], dtype=np.int64)
    a = np.ones(1 << 16, dtype=np.int64)
    b = np.ones(2, dtype=np.int64)
    out = np.zeros(2, dtype=np.int64)
    mask = int_dtype.type(1)
    change_sums(np.array([0, 2], dtype=np.int64), bits[:2], bits[:2], starts, a, b, mask, out, -1)
    full_sums(bits, starts, a, b, out)
    count_nonfinite(bits, mask)
