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
