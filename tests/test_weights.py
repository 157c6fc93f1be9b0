"""Tests for rapid_async.weights: bit-exact deltas, snapshots, checksums, NeedSnapshot."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rapid_async import weights
from rapid_async.wire.protocol import decode, encode
from rapid_async.weights import (
    NeedSnapshot,
    apply_update,
    cast_state,
    make_delta,
    make_snapshot,
    state_checksum,
)

_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
_SPECIAL = {  # raw bit patterns: NaN, -NaN payload, +inf, -inf, -0.0, smallest subnormal
    torch.float32: [0x7FC00001, -0x00400001, 0x7F800000, -0x00800000, -0x80000000, 1],
    torch.bfloat16: [0x7FC1, -0x003F, 0x7F80, -0x0080, -0x8000, 1],
    torch.float16: [0x7E01, -0x01FF, 0x7C00, -0x0400, -0x8000, 1],
}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as same-width integers (NaN == NaN here)."""
    widths = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return tensor.view(widths[tensor.element_size()])


@st.composite
def state_pairs(draw, dtype: torch.dtype):
    """Two states of random bit patterns (special floats included) with the same layout."""
    n_tensors = draw(st.integers(1, 3))
    info = torch.iinfo(_INT[dtype])
    patterns = st.one_of(st.integers(info.min, info.max), st.sampled_from(_SPECIAL[dtype]))
    prev, new = {}, {}
    for i in range(n_tensors):
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)))
        n = int(np.prod(shape))
        a = torch.tensor(draw(st.lists(patterns, min_size=n, max_size=n)), dtype=_INT[dtype]).view(dtype)
        b = torch.tensor(draw(st.lists(patterns, min_size=n, max_size=n)), dtype=_INT[dtype]).view(dtype)
        prev[f"layer{i}.weight"], new[f"layer{i}.weight"] = a.reshape(shape), b.reshape(shape)
    return prev, new


def _assert_bit_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(_bits(a[name]), _bits(b[name])), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_deltas_round_trip_bit_exactly(dtype):
    @settings(max_examples=40, deadline=None)
    @given(state_pairs(dtype), st.sampled_from([0, 1, 6]))
    def check(pair, level):
        prev, new = pair
        update = decode(encode(make_delta(prev, new, version=8, base_version=7, level=level)))
        _assert_bit_equal(apply_update(prev, 7, update), new)

    check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_snapshots_round_trip_bit_exactly(dtype):
    @settings(max_examples=20, deadline=None)
    @given(state_pairs(dtype), st.sampled_from([0, 1]))
    def check(pair, level):
        _, new = pair
        update = make_snapshot(new, version=3, level=level)
        assert update.kind == "snapshot" and update.base_version is None
        _assert_bit_equal(apply_update(None, None, update), new)

    check()


def test_mixed_widths_and_integer_buffers_round_trip():
    prev = {"w": torch.randn(5, 3, dtype=torch.bfloat16), "pos": torch.arange(7), "mask": torch.tensor([True, False])}
    new = {"w": prev["w"] * 2, "pos": torch.arange(7) + 1, "mask": torch.tensor([False, False])}
    _assert_bit_equal(apply_update(prev, 0, make_delta(prev, new, 1, 0)), new)
    _assert_bit_equal(apply_update(None, None, make_snapshot(new, 1, level=1)), new)


def test_cast_state_copies_to_contiguous_cpu_in_the_inference_dtype():
    linear = torch.nn.Linear(4, 3)
    state = dict(linear.state_dict(), steps=torch.tensor(5), wt=linear.weight.t())
    cast = cast_state(state, "bfloat16")
    assert cast["weight"].dtype == torch.bfloat16 and cast["steps"].dtype == torch.int64
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in cast.values())
    assert torch.equal(cast["weight"], linear.weight.detach().to(torch.bfloat16))
    with torch.no_grad():
        linear.weight.add_(1.0)  # the copy does not follow the model
    assert not torch.equal(cast["weight"], linear.weight.detach().to(torch.bfloat16))
    with pytest.raises(ValueError, match="'int8' is not an inference dtype"):
        cast_state(state, "int8")


def test_checksum_detects_a_single_flipped_bit_and_layout_changes():
    state = {"a": torch.randn(64, dtype=torch.float32), "b": torch.randn(3, 3).to(torch.float16)}
    reference = state_checksum(state)
    assert reference.startswith("sha256:") and state_checksum(dict(reversed(state.items()))) == reference
    for name in state:
        for position in (0, state[name].numel() - 1):
            flipped = {k: v.clone() for k, v in state.items()}
            bits = _bits(flipped[name]).reshape(-1)
            bits[position] ^= 1  # lowest mantissa bit
            assert state_checksum(flipped) != reference
    assert state_checksum({"a": state["a"].reshape(8, 8), "b": state["b"]}) != reference
    assert state_checksum({"c": state["a"], "b": state["b"]}) != reference


def test_delta_on_the_wrong_base_raises_need_snapshot():
    prev = {"w": torch.randn(10)}
    new = {"w": prev["w"] + 0.5}
    delta = make_delta(prev, new, version=5, base_version=4)
    with pytest.raises(NeedSnapshot, match="delta 4->5 does not apply to the current version 3"):
        apply_update(prev, 3, delta)
    with pytest.raises(NeedSnapshot, match="current version None"):
        apply_update(None, None, delta)
    # Right version number, wrong weights: the checksum catches it.
    with pytest.raises(NeedSnapshot, match="checksum mismatch for version 5"):
        apply_update({"w": prev["w"] + 1.0}, 4, delta)
    with pytest.raises(NeedSnapshot, match="does not match the current weights: 'w'"):
        apply_update({"w": torch.randn(11)}, 4, delta)
    with pytest.raises(NeedSnapshot, match="names differ"):
        apply_update({"v": prev["w"]}, 4, delta)


def test_make_delta_refuses_different_layouts():
    with pytest.raises(ValueError, match="prev_state and new_state differ"):
        make_delta({"w": torch.zeros(2)}, {"w": torch.zeros(2, dtype=torch.float16)}, 1, 0)


def _flip_byte(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 0x10]) + data[position + 1 :]


@pytest.mark.parametrize("level", [0, 1])
def test_corrupt_or_truncated_payloads_raise_need_snapshot(level):
    prev = {"w": torch.randn(256), "b": torch.randn(16)}
    new = {k: v + 0.01 for k, v in prev.items()}
    for update in (make_delta(prev, new, 2, 1, level=level), make_snapshot(new, 2, level=level)):
        cases = {
            "truncated": update.payload[: len(update.payload) // 2],
            "prefix": b"XXXX" + update.payload[4:],
            "empty": b"",
            "flipped": _flip_byte(update.payload, len(update.payload) // 2),
            "flipped_tail": _flip_byte(update.payload, len(update.payload) - 3),
        }
        for what, payload in cases.items():
            with pytest.raises(NeedSnapshot, match="version 2"):
                apply_update(prev, 1, dataclasses.replace(update, payload=payload))
    with pytest.raises(NeedSnapshot, match="sizes do not add up to"):
        apply_update(prev, 1, dataclasses.replace(update, raw_nbytes=update.raw_nbytes - 1))


def test_decompression_is_bounded_by_the_declared_sizes():
    """A chunk that inflates beyond its declared raw size is refused (no zip bomb)."""
    update = make_snapshot({"w": torch.zeros(1 << 20)}, 1, level=1)
    magic, level, width, n = struct.unpack_from("<4sBBI", update.payload)
    assert (magic, level, width, n) == (b"RPW1", 1, 4, 2)  # header chunk + one data chunk
    (head_raw, head_size), (data_raw, data_size) = struct.iter_unpack("<QQ", update.payload[10 : 10 + 32])
    assert data_raw == 4 << 20 and data_size < 100_000
    forged = update.payload[:10] + struct.pack("<QQQQ", head_raw, head_size, 100, data_size) + update.payload[42:]
    with pytest.raises(NeedSnapshot, match="truncated or too long"):
        apply_update(None, None, dataclasses.replace(update, payload=forged, raw_nbytes=head_raw + 100))


def test_large_states_travel_in_several_chunks(monkeypatch):
    monkeypatch.setattr(weights, "CHUNK_BYTES", 4096)
    prev = {"a": torch.randn(3000), "b": torch.randn(50, 70)}
    new = {name: tensor * 1.001 for name, tensor in prev.items()}
    delta = make_delta(prev, new, 1, 0)
    assert struct.unpack_from("<4sBBI", delta.payload)[3] == 1 + -(-(3000 + 3500) * 4 // 4096)
    _assert_bit_equal(apply_update(prev, 0, delta), new)


def test_delta_after_small_sgd_step_compresses_well(capsys):
    """Reports compressed vs raw size of a delta on a ~1M-parameter model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    sizes = {}
    before = {dtype: cast_state(model.state_dict(), dtype) for dtype in ("float32", "bfloat16", "float16")}
    model(torch.randn(64, 512)).pow(2).mean().backward()
    optimizer.step()
    for dtype, prev in before.items():
        new = cast_state(model.state_dict(), dtype)
        delta = make_delta(prev, new, 1, 0)
        _assert_bit_equal(apply_update(prev, 0, delta), new)
        sizes[dtype] = len(delta.payload) / delta.raw_nbytes
        with capsys.disabled():
            print(f"\n{dtype} delta, 1.05M params: {delta.raw_nbytes} -> {len(delta.payload)} bytes ({sizes[dtype]:.3f})")
    assert sizes["float32"] < 0.45 and sizes["bfloat16"] < 0.05 and sizes["float16"] < 0.1
