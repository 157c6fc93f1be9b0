"""Tests for rapid_async.weights.digest: the linear digest, its O(changes) update, certificates."""

from __future__ import annotations

import pytest
import torch

from rapid_async.weights import digest
from rapid_async.weights.layout import Layout

MASK = (1 << 64) - 1


def reference_digest(bits: torch.Tensor) -> int:
    """sum_i a_i * x_i mod 2^64 with Python integers (the definition, slowly)."""
    a = digest._splitmix64(0x5EED0000, 1 << 16).view("uint64")
    rows = bits.numel() // (1 << 16) + 1
    b = digest._splitmix64(0x5EED0000 + 0x1000_0000, max(rows, 64)).view("uint64")
    total = 0
    for i, x in enumerate(bits.reshape(-1).tolist()):
        total += int(a[i % (1 << 16)]) * int(b[i >> 16]) * x
    return total & MASK


@pytest.mark.parametrize("n,dtype", [(0, torch.int16), (5, torch.int16), (70_001, torch.int16),
                                     (1000, torch.int32)])
def test_digest_matches_the_definition(n, dtype):
    info = torch.iinfo(dtype)
    bits = torch.randint(info.min, info.max, (n,), dtype=dtype, generator=torch.Generator().manual_seed(n))
    assert int(digest.tensor_digest(bits)) & MASK == reference_digest(bits)


def test_every_single_flipped_bit_changes_the_digest():
    bits = torch.randint(-2**15, 2**15 - 1, (3000,), dtype=torch.int16,
                         generator=torch.Generator().manual_seed(0))
    reference = int(digest.tensor_digest(bits))
    for position in (0, 1, 1777, 2999):
        for bit in range(16):
            flipped = bits.clone()
            flipped[position] ^= torch.tensor(1 << bit, dtype=torch.int32).to(torch.int16)
            assert int(digest.tensor_digest(flipped)) != reference, (position, bit)
    # Across positions at once: a_i is odd, so a_i * (+-2^b) is never 0 mod 2^64.
    a = digest.multipliers(torch.arange(200_000))
    assert bool((a & 1 == 1).all())


def _random_layout_and_buffer(seed: int) -> tuple[Layout, torch.Tensor]:
    layout = Layout("bfloat16", [("a", (300, 7)), ("empty", (0,)), ("b", (70_000,)), ("c", (5,))])
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randint(-2**15, 2**15 - 1, (layout.numel,), dtype=torch.int16, generator=gen)
    return layout, flat.view(torch.bfloat16)


@pytest.mark.parametrize("density", [0.0, 0.001, 0.2, 1.0])
def test_updated_digests_equal_digests_of_the_changed_buffer(density):
    layout, flat = _random_layout_and_buffer(1)
    before = digest.state_digests(flat, layout)
    gen = torch.Generator().manual_seed(2)
    idx = torch.nonzero(torch.rand(layout.numel, generator=gen) < density).squeeze(1)
    bits = flat.view(torch.int16)
    old = bits[idx]
    new = torch.randint(-2**15, 2**15 - 1, (idx.numel(),), dtype=torch.int16, generator=gen)
    updated = digest.updated_digests(before, layout, idx, old, new)
    bits[idx] = new
    assert torch.equal(updated, digest.state_digests(flat, layout))


def test_certificate_binds_every_header_field():
    args = dict(kind="delta", version=5, base_version=4, dtype="bfloat16", layout_hash="h",
                digests=[1, 2, 3], data_sha256=None)
    reference = digest.certificate(**args)
    for field, value in [("kind", "snapshot"), ("version", 6), ("base_version", 3),
                         ("dtype", "float16"), ("layout_hash", "g"), ("digests", [1, 2, 4]),
                         ("data_sha256", "ab")]:
        assert digest.certificate(**{**args, field: value}) != reference, field


def test_state_digest_ignores_order_but_not_names_or_values():
    x, y = torch.randn(4, 3).bfloat16(), torch.randn(7).bfloat16()
    reference = digest.digest_named({"x": x, "y": y}, "bfloat16")
    assert reference.startswith("lin64:")
    assert digest.digest_named({"y": y, "x": x}, "bfloat16") == reference
    assert digest.digest_named({"x": x, "z": y}, "bfloat16") != reference
    assert digest.digest_named({"x": x.reshape(3, 4), "y": y}, "bfloat16") != reference
    assert digest.digest_named({"x": x, "y": -y}, "bfloat16") != reference


# ---------------------------------------------------------------- the two paths
# On the CPU digest.py runs fused numba loops (kernels.py); on CUDA, and without
# numba, tensor ops. Both must give the definition's numbers.


def test_the_cpu_kernels_are_installed_and_used():
    assert digest._kernels() is not None  # numba is a dependency; without it the CPU is slower


def _layout_and_bits(dtype: str, seed: int) -> tuple[Layout, torch.Tensor]:
    layout = Layout(dtype, [("a", (300, 7)), ("empty", (0,)), ("b", (140_000,)), ("c", (5,)),
                            ("d", (65_536,))])
    int_dtype = layout.int_dtype
    info = torch.iinfo(int_dtype)
    bits = torch.randint(info.min, info.max, (layout.numel,), dtype=int_dtype,
                         generator=torch.Generator().manual_seed(seed))
    return layout, bits


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_kernel_digests_equal_the_tensor_ops_and_the_definition(dtype):
    layout, bits = _layout_and_bits(dtype, 3)
    fused = digest.state_digests(bits.view(layout.torch_dtype), layout)
    by_ops = [int(digest.tensor_digest(bits[o:o + n])) for o, n in zip(layout.offsets, layout.numels)]
    assert fused.tolist() == by_ops
    assert int(fused[3]) & MASK == reference_digest(bits[layout.offsets[3]:layout.offsets[3] + 5])


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("density", [0.0, 0.01, 1.0])
def test_check_changes_equals_the_tensor_ops_and_a_full_recompute(dtype, density, threads, monkeypatch):
    monkeypatch.setattr(digest, "_THREADS", threads)  # split into parts even for small deltas
    monkeypatch.setattr(digest, "_SPLIT_MIN", 1 if threads > 1 else 1 << 20)
    layout, bits = _layout_and_bits(dtype, 4)
    before = digest.state_digests(bits.view(layout.torch_dtype), layout)
    gen = torch.Generator().manual_seed(5)
    idx = torch.nonzero(torch.rand(layout.numel, generator=gen) < density).squeeze(1)
    info = torch.iinfo(layout.int_dtype)
    old = bits[idx]
    new = torch.randint(info.min, info.max, (idx.numel(),), dtype=layout.int_dtype, generator=gen)
    new[:3] = old[:3] ^ info.min  # sign flips: differences beyond the width (no wrapping)
    fused, nonfinite = digest.check_changes(before, layout, idx, old, new)
    assert torch.equal(fused, digest.updated_digests(before, layout, idx, old, new))
    bits[idx] = new
    assert torch.equal(fused, digest.state_digests(bits.view(layout.torch_dtype), layout))
    assert nonfinite == int((~torch.isfinite(new.view(layout.torch_dtype))).sum())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_non_finite_counts_agree_with_isfinite_on_every_16_bit_pattern(dtype, monkeypatch):
    layout = Layout(dtype, [("x", (1 << 16,))])
    bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    want = int((~torch.isfinite(bits.view(layout.torch_dtype))).sum())
    assert want == (256 if dtype == "bfloat16" else 2048)  # +-inf and the NaNs: exponent all ones
    assert digest.nonfinite(bits, layout) == want
    monkeypatch.setattr(digest, "_kernels", lambda: None)
    assert digest.nonfinite(bits, layout) == want


def test_float32_non_finite_values_are_counted():
    layout = Layout("float32", [("x", (7,))])
    values = torch.tensor([0.0, -1.5, float("inf"), float("-inf"), float("nan"), 3e38, -1e-45])
    assert digest.nonfinite(values.view(torch.int32), layout) == 3


@pytest.mark.parametrize("threads", [1, 2])
def test_check_changes_refuses_positions_outside_the_buffer_or_unsorted(threads, monkeypatch):
    monkeypatch.setattr(digest, "_THREADS", threads)
    monkeypatch.setattr(digest, "_SPLIT_MIN", 1)
    layout, bits = _layout_and_bits("bfloat16", 6)
    before = digest.state_digests(bits.view(torch.bfloat16), layout)
    for idx in ([5, 6, 8, layout.numel], [2, 9, 9, 10], [1, 7, 3, 8], [-1, 1, 2, 3]):
        idx = torch.tensor(idx)  # with 2 threads the middle pairs straddle the cut
        with pytest.raises(ValueError, match="outside"):
            digest.check_changes(before, layout, idx, torch.zeros(4, dtype=torch.int16),
                                 torch.ones(4, dtype=torch.int16))
