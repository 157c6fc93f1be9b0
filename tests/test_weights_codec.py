"""Tests for rapid_async.weights.codec: symbols, streams, entropy bound, header checks."""

from __future__ import annotations

import math
import struct

import msgpack
import pytest
import torch

from rapid_async.weights import codec
from rapid_async.weights.codec import Delta, PayloadError
from rapid_async.weights.layout import Layout


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
def test_zigzag_and_wrapping_arithmetic_invert(dtype):
    info = torch.iinfo(dtype)
    x = torch.tensor([0, 1, -1, 2, -2, info.max, info.min, info.max - 1], dtype=dtype)
    assert codec.zigzag(x)[:5].tolist() == [0, 2, 1, 4, 3]
    assert torch.equal(codec.unzigzag(codec.zigzag(x)), x)
    a = torch.tensor([info.max, info.min, 5], dtype=dtype)
    b = torch.tensor([info.min, info.max, -7], dtype=dtype)
    assert torch.equal(codec.wrap_add(a, codec.wrap_sub(b, a)), b)


def test_delta_streams_by_hand():
    delta = Delta(torch.tensor([0, 3, 300, 301]), torch.tensor([1, -1, 2, -32768], dtype=torch.int16))
    streams = codec.delta_streams(delta)
    # gaps: 0, 3-0-1 = 2, 300-3-1 = 296 (escaped), 0
    assert streams["gaps"].tolist() == [0, 2, 255, 0]
    assert streams["large"].tolist() == [296]
    # zigzag 1 -> 2, -1 -> 1, 2 -> 4, -32768 -> 65535: low bytes, then high bytes
    assert streams["values"].tolist() == [2, 1, 4, 255, 0, 0, 0, 255]
    back = codec.decode_streams(streams["gaps"], streams["large"], streams["values"], torch.int16, 302)
    assert torch.equal(back.idx, delta.idx) and torch.equal(back.diff, delta.diff)
    with pytest.raises(PayloadError, match="changes position 301 of a state of 301"):
        codec.decode_streams(streams["gaps"], streams["large"], streams["values"], torch.int16, 301)
    with pytest.raises(PayloadError, match="1 escaped gaps but 0 large"):
        codec.decode_streams(streams["gaps"], streams["large"][:0], streams["values"], torch.int16, 302)


def test_extract_delta_finds_exactly_the_changes(monkeypatch):
    monkeypatch.setattr(codec, "_CHUNK", 7)  # several chunks
    old = torch.arange(30, dtype=torch.int16)
    new = old.clone()
    new[[0, 6, 7, 29]] += torch.tensor([1, -3, 100, 1], dtype=torch.int16)
    delta = codec.extract_delta(old, new)
    assert delta.idx.tolist() == [0, 6, 7, 29] and delta.diff.tolist() == [1, -3, 100, 1]


def test_entropy_bound_by_hand():
    # n = 8 elements, changes +1, +1, -1: symbols 0 x5, 1 x2, 0xFFFF x1.
    bits = codec.entropy_bound_bits(8, torch.tensor([1, 1, -1], dtype=torch.int16))
    expected = 5 * math.log2(8 / 5) + 2 * math.log2(8 / 2) + 1 * math.log2(8 / 1)
    assert bits == pytest.approx(expected, rel=1e-12)
    assert codec.entropy_bound_bits(8, torch.tensor([1, 1, -1], dtype=torch.int32)) == pytest.approx(expected)
    assert codec.entropy_bound_bits(8, torch.zeros(0, dtype=torch.int16)) == 0.0
    # every element changed by the same symbol: nothing to say but "all +1"
    assert codec.entropy_bound_bits(4, torch.ones(4, dtype=torch.int16)) == pytest.approx(0.0, abs=1e-9)


def _payload(header: dict, body: bytes = b"") -> bytes:
    packed = msgpack.packb(header)
    return b"RPW2" + struct.pack("<I", len(packed)) + packed + body


@pytest.mark.parametrize("payload,match", [
    (b"", "does not start with"),
    (b"RPW1" + bytes(20), "does not start with"),
    (b"RPW2" + struct.pack("<I", 1 << 30), "does not fit"),
    (b"RPW2" + struct.pack("<I", 3) + b"\xc1\xc1\xc1", "not msgpack"),
    (_payload({"kind": "snapshot"}), "not a delta header"),
    (_payload({"kind": "delta", "streams": [["gaps", "zstd", 0, 0]]}), "streams must be"),
    (_payload({"kind": "delta", "streams": [["gaps", "lz4", 0, 0], ["large", "zstd", 0, 0],
                                            ["values", "zstd", 0, 0]]}), "malformed"),
    (_payload({"kind": "delta", "streams": [["gaps", "zstd", 0, 5], ["large", "zstd", 0, 0],
                                            ["values", "zstd", 0, 0]]}), "header accounts for"),
    (_payload({"kind": "delta", "streams": [["gaps", "raw", 4, 3], ["large", "zstd", 0, 0],
                                            ["values", "zstd", 0, 0]]}, b"abc"), "stores 3"),
])
def test_read_header_refuses_malformed_payloads(payload, match):
    with pytest.raises(PayloadError, match=match):
        codec.read_header(payload, "delta")


def test_delta_sizes_must_be_what_the_count_implies():
    layout = Layout("bfloat16", [("w", (100,))])
    delta = codec.extract_delta(torch.zeros(100, dtype=torch.int16), torch.ones(100, dtype=torch.int16))
    payload, raw = codec.pack_delta(delta, layout)
    header = codec.read_header(payload, "delta")
    assert codec.check_delta_sizes(header, layout) == (100, 0) and raw == 100 + 0 + 200
    small = Layout("bfloat16", [("w", (99,))])
    with pytest.raises(PayloadError, match="declares 100 changes"):
        codec.check_delta_sizes(header, small)
    header.fields["large"] = 2  # 100 elements cannot hold two gaps of >= 255
    with pytest.raises(PayloadError, match="2 large gaps"):
        codec.check_delta_sizes(header, layout)
    header.fields["large"] = 0
    header.streams["values"] = ("zstd", 199, header.streams["values"][2])
    with pytest.raises(PayloadError, match="'values' declares 199 bytes, 100 changes need 200"):
        codec.check_delta_sizes(header, layout)
