"""Tests for rapid_async.weights (layout.py, states.py): bit-exact round trips, layouts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rapid_async.weights import Layout, NeedSnapshot, apply_update, cast_state, make_delta, make_snapshot
from rapid_async.wire.protocol import decode, encode

_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as same-width integers (NaN == NaN here)."""
    return tensor.view(_INT[tensor.dtype])


@st.composite
def state_pairs(draw, dtype: torch.dtype):
    """Two finite states with the same layout; the second changes a random subset
    of elements (any density, so gaps of every size) by one ulp or to any pattern."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    info = torch.iinfo(_INT[dtype])
    density = draw(st.sampled_from([0.0, 1e-4, 0.004, 0.05, 0.5, 1.0]))
    prev, new = {}, {}
    for i in range(draw(st.integers(1, 3))):
        shape = tuple(draw(st.lists(st.integers(1, 400), min_size=0, max_size=2)))
        a = _finite_bits(torch.randint(info.min, info.max, shape, dtype=_INT[dtype], generator=gen), dtype)
        changed = torch.rand(shape, generator=gen) < density
        if draw(st.booleans()):  # one ulp up or down, as after a small optimizer step
            step = torch.randint(0, 2, shape, generator=gen, dtype=_INT[dtype]) * 2 - 1
            b = _finite_bits(a + step, dtype)
        else:
            b = _finite_bits(torch.randint(info.min, info.max, shape, dtype=_INT[dtype], generator=gen), dtype)
        prev[f"layer{i}.weight"] = a.view(dtype)
        new[f"layer{i}.weight"] = torch.where(changed, b, a).view(dtype)
    return prev, new


def _finite_bits(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bit patterns with every NaN / inf pattern replaced by 0."""
    return torch.where(torch.isfinite(bits.view(dtype)), bits, torch.zeros_like(bits))


def _assert_bit_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(_bits(a[name]), _bits(b[name])), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_deltas_round_trip_bit_exactly(dtype):
    """Any change (all bit patterns, gaps of every size) comes back exactly, through the wire."""
    @settings(max_examples=40, deadline=None)
    @given(state_pairs(dtype))
    def check(pair):
        prev, new = pair
        update = decode(encode(make_delta(prev, new, version=8, base_version=7)))
        _assert_bit_equal(apply_update(prev, 7, update), new)

    check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_snapshots_round_trip_bit_exactly(dtype):
    @settings(max_examples=20, deadline=None)
    @given(state_pairs(dtype))
    def check(pair):
        _, new = pair
        update = decode(encode(make_snapshot(new, version=3)))
        assert update.kind == "snapshot" and update.base_version is None
        _assert_bit_equal(apply_update(None, None, update), new)

    check()


def test_large_gaps_and_special_values_round_trip():
    """Gaps of 254, 255, 256 and far beyond, -0.0 and subnormals, in bf16 and fp32."""
    for dtype in (torch.bfloat16, torch.float32):
        prev = {"w": torch.zeros(200_000, dtype=dtype)}
        new = {"w": prev["w"].clone()}
        for i in (0, 255, 511, 768, 70_000, 199_999):
            new["w"][i] = 0.5
        new["w"][100] = -0.0
        _bits(new["w"])[101] = 1  # smallest subnormal
        update = make_delta(prev, new, 1, 0)
        _assert_bit_equal(apply_update(prev, 0, update), new)


def test_unchanged_weights_give_an_empty_delta_that_still_advances_the_version():
    state = {"w": torch.randn(1000).bfloat16()}
    update = make_delta(state, state, 5, 4)
    assert len(update.payload) < 200
    _assert_bit_equal(apply_update(state, 4, update), state)


def test_non_finite_weights_are_refused():
    prev = {"w": torch.ones(10)}
    new = {"w": torch.ones(10)}
    new["w"][3] = float("nan")
    with pytest.raises(NeedSnapshot, match="non-finite"):
        apply_update(prev, 0, make_delta(prev, new, 1, 0))
    with pytest.raises(NeedSnapshot, match="non-finite"):
        apply_update(None, None, make_snapshot(new, 1))


def test_make_delta_refuses_different_layouts():
    with pytest.raises(ValueError, match="prev and new differ"):
        make_delta({"w": torch.zeros(2)}, {"w": torch.zeros(3)}, 1, 0)
    with pytest.raises(ValueError, match="prev and new differ"):
        make_delta({"w": torch.zeros(2)}, {"w": torch.zeros(2, dtype=torch.float16)}, 1, 0)
    mixed = {"w": torch.zeros(2), "v": torch.zeros(2, dtype=torch.float16)}
    with pytest.raises(ValueError, match="one inference dtype"):
        make_delta(mixed, mixed, 1, 0)


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


def test_layout_lists_tied_parameters_once_and_checks_what_fits():
    from rapid_async.tinymodel import build_model

    model = build_model(seed=0)
    assert model.config.tie_word_embeddings
    layout = Layout.from_model(model, "bfloat16")
    assert "lm_head.weight" not in layout.names and "model.embed_tokens.weight" in layout.names
    assert layout.numel == sum(p.numel() for p in model.parameters())
    assert layout.nbytes == 2 * layout.numel and layout.int_dtype == torch.int16
    required = dict(zip(layout.names, layout.shapes))
    layout.check_fits(required, {"lm_head.weight"}, torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16, the engine runs in torch.float32"):
        layout.check_fits(required, set(), torch.float32)
    with pytest.raises(ValueError, match="lack 1 tensor"):
        layout.check_fits({**required, "extra.weight": (2,)})
    name = layout.names[1]
    with pytest.raises(ValueError, match=f"{name!r} shape"):
        layout.check_fits({**required, name: (1, 2)})
    wire = Layout.from_wire("bfloat16", layout.to_wire())
    assert wire == layout and wire.hash() == layout.hash()


@pytest.mark.parametrize("wire", [
    "not a list", [["w", [2 ** 40, 2 ** 40]]], [["w", [-1]]], [["w", [2]], ["w", [3]]],
    [["", [1]]], [["w", ["3"]]], [["w"]], [[7, [1]]],
])
def test_layout_refuses_malformed_or_huge_wire_layouts(wire):
    with pytest.raises(ValueError, match="layout"):
        Layout.from_wire("bfloat16", wire)


def test_corrupt_header_fields_are_refused():
    """version, base_version, kind and dtype are all bound by the checksum."""
    prev = {"w": torch.randn(300).bfloat16()}
    new = {"w": (prev["w"].float() + 0.05).bfloat16()}
    update = make_delta(prev, new, 2, 1)
    for change in ({"version": 3}, {"dtype": "float16"}, {"checksum": "sha256:00"}):
        with pytest.raises(NeedSnapshot):
            apply_update(prev, 1, dataclasses.replace(update, **change))
    with pytest.raises(NeedSnapshot, match="does not apply to the current version 1"):
        apply_update(prev, 1, dataclasses.replace(update, base_version=0))
