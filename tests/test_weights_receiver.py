"""Tests for rapid_async.weights.receiver: the actor's weight intake, with the real hf engine.

Valid updates are written straight into the engine's parameters; everything
else (flipped bits, wrong or altered versions, truncated payloads,
decompression bombs, headers that declare huge shapes or counts, NaN weights
with a valid checksum, wrong shapes) raises NeedSnapshot and leaves the
engine's weights exactly as they were.
"""

from __future__ import annotations

import dataclasses
import struct

import msgpack
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rapid_async.engines.hf import HFEngine
from rapid_async.weights import NeedSnapshot, WeightReceiver, codec, make_delta, make_snapshot
from rapid_async.wire.protocol import WeightUpdate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(random_model_dir):
    return HFEngine(random_model_dir, dtype="bfloat16")


@pytest.fixture
def learner_state(engine):
    """The learner's weights at version 1: the engine's parameters, in their order."""
    gen = torch.Generator().manual_seed(0)
    return {n: (p.detach().float() + 0.01 * torch.randn(p.shape, generator=gen)).bfloat16()
            for n, p in engine.model.named_parameters()}


@pytest.fixture
def receiver(engine, learner_state):
    receiver = WeightReceiver(engine)
    receiver.apply(make_snapshot(learner_state, 1))
    receiver.commit()
    return receiver


def step(state: dict, seed: int, scale: float = 1e-3) -> dict:
    """A small change of some elements, as an optimizer step makes."""
    gen = torch.Generator().manual_seed(seed)
    return {n: (t.float() * (1 + scale * torch.randn(t.shape, generator=gen))).bfloat16()
            for n, t in state.items()}


def engine_bits(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().view(torch.int16).clone() for n, p in engine.model.named_parameters()}


def assert_engine_holds(engine, state: dict) -> None:
    for name, parameter in engine.model.named_parameters():
        assert torch.equal(parameter.detach().view(torch.int16), state[name].view(torch.int16)), name


def test_snapshot_then_deltas_are_written_into_the_engine_in_place(engine, learner_state, receiver):
    assert_engine_holds(engine, learner_state)
    buffer_start = receiver.flat.data_ptr()
    embed = engine.model.get_input_embeddings().weight
    assert embed.data_ptr() == buffer_start  # the parameters are views of the buffer
    assert engine.model.lm_head.weight.data_ptr() == buffer_start  # tied: the same storage
    state = learner_state
    for version in (2, 3, 4):
        new = step(state, version)
        receiver.apply(make_delta(state, new, version, version - 1))
        state = new
    receiver.commit()
    assert receiver.version == 4 and receiver.flat.data_ptr() == buffer_start
    assert_engine_holds(engine, state)
    assert receiver.buffer_digest() == receiver.state_digest
    out = engine.generate(__import__("rapid_async.engines.base", fromlist=["x"]).GenerateRequest(
        prompts=[[1, 5, 6]], n=2, max_new_tokens=4, seed=0))
    assert len(out[0]) == 2


def refused(receiver, engine, update, match: str | None = None) -> None:
    """`update` raises NeedSnapshot (matching `match`) and changes nothing."""
    before, version = engine_bits(engine), receiver.version
    with pytest.raises(NeedSnapshot, match=match):
        receiver.apply(update)
    assert receiver.version == version
    after = engine_bits(engine)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_wrong_or_altered_versions_are_refused(engine, learner_state, receiver):
    delta = make_delta(learner_state, step(learner_state, 5), 2, 1)
    refused(receiver, engine, dataclasses.replace(delta, base_version=0), "does not apply to the current version 1")
    refused(receiver, engine, dataclasses.replace(delta, version=3), "checksum mismatch")
    refused(receiver, engine, dataclasses.replace(delta, dtype="float16"), "is float16")
    other = make_delta(step(learner_state, 6), step(learner_state, 5), 2, 1)  # right numbers, other base
    refused(receiver, engine, other, "checksum mismatch")


def test_a_flipped_bit_anywhere_in_a_delta_is_refused(engine, learner_state, receiver):
    delta = make_delta(learner_state, step(learner_state, 7), 2, 1)
    payload = bytearray(delta.payload)
    for position in range(0, len(payload), max(1, len(payload) // 97)):
        for bit in (0, 7):
            flipped = bytearray(payload)
            flipped[position] ^= 1 << bit
            refused(receiver, engine, dataclasses.replace(delta, payload=bytes(flipped)))
    receiver.apply(delta)  # the original still applies
    assert receiver.version == 2


def test_a_flipped_bit_in_a_snapshot_is_refused(engine, learner_state, receiver):
    snap = make_snapshot(step(learner_state, 8), 9)
    payload = bytearray(snap.payload)
    payload[-3] ^= 0x01  # a low mantissa bit of the last tensor
    refused(receiver, engine, dataclasses.replace(snap, payload=bytes(payload)), "checksum mismatch")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_or_mutated_payloads_are_refused(engine, learner_state, receiver, data):
    update = data.draw(st.sampled_from(["delta", "snapshot"]))
    valid = (make_delta(learner_state, step(learner_state, 3), 2, 1) if update == "delta"
             else make_snapshot(step(learner_state, 3), 2))
    payload = bytearray(valid.payload)
    op = data.draw(st.sampled_from(["truncate", "extend", "overwrite", "empty"]))
    if op == "truncate":
        payload = payload[:data.draw(st.integers(0, len(payload) - 1))]
    elif op == "extend":
        payload += data.draw(st.binary(min_size=1, max_size=64))
    elif op == "overwrite":
        at = data.draw(st.integers(0, len(payload) - 1))
        junk = data.draw(st.binary(min_size=1, max_size=16))
        if payload[at:at + len(junk)] == junk:
            return
        payload[at:at + len(junk)] = junk
        payload = payload[:len(valid.payload)]
    else:
        payload = bytearray()
    refused(receiver, engine, dataclasses.replace(valid, payload=bytes(payload)))


def forged_delta(receiver, header_changes: dict, streams: dict[str, bytes]) -> WeightUpdate:
    """A delta payload with a hand-made header (sizes as declared by `streams`)."""
    header = {"kind": "delta", "layout_hash": receiver.layout.hash(), "count": 0, "large": 0,
              **header_changes}
    header["streams"] = [[name, "zstd", raw, len(data)] for name, (raw, data) in streams.items()]
    packed = msgpack.packb(header)
    payload = b"RPW2" + struct.pack("<I", len(packed)) + packed + b"".join(d for _, d in streams.values())
    return WeightUpdate(receiver.version + 1, receiver.version, "delta", "sha256:0", "bfloat16", payload, 0)


def test_decompression_bombs_are_refused_before_decompressing(engine, receiver, monkeypatch):
    calls = []
    real = zstandard.ZstdDecompressor.decompress
    monkeypatch.setattr(zstandard.ZstdDecompressor, "decompress",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(1 << 30))  # 1 GiB of zeros, ~32 KiB
    assert len(bomb) < 100_000
    numel = receiver.layout.numel
    k = 1000
    # Declared sizes that fit the model, but the frame holds far more than declared.
    lies = forged_delta(receiver, {"count": k}, {"gaps": (k, bomb), "large": (0, b""),
                                                 "values": (2 * k, bomb)})
    refused(receiver, engine, lies, "frame declares 1073741824 bytes, the header 1000")
    # Declared sizes larger than the model can hold.
    huge = forged_delta(receiver, {"count": numel + 1},
                        {"gaps": (numel + 1, bomb), "large": (0, b""), "values": (2 * numel + 2, bomb)})
    refused(receiver, engine, huge, f"the model has {numel} elements")
    # A frame that does not say how much it holds (streamed) is refused too.
    streamed = zstandard.ZstdCompressor().compressobj().compress(bytes(k)) + \
        zstandard.ZstdCompressor().compressobj().flush()
    unknown = forged_delta(receiver, {"count": k}, {"gaps": (k, streamed), "large": (0, b""),
                                                    "values": (2 * k, streamed)})
    refused(receiver, engine, unknown, "frame declares")
    assert not calls, "nothing may be decompressed before the sizes are checked"


def test_positions_outside_the_model_are_refused(engine, receiver):
    k = 2
    gaps = bytes([255, 0])
    large = struct.pack("<q", receiver.layout.numel + 10)
    values = bytes(2 * k)
    z = zstandard.ZstdCompressor()
    update = forged_delta(receiver, {"count": k, "large": 1},
                          {"gaps": (k, z.compress(gaps)), "large": (8, z.compress(large)),
                           "values": (2 * k, z.compress(values))})
    refused(receiver, engine, update, "changes position")


def test_snapshots_that_do_not_fit_the_model_are_refused(engine, learner_state, receiver):
    # A header that declares a huge shape: refused from the header alone.
    snap = make_snapshot(learner_state, 2)
    parsed = codec.read_header(snap.payload, "snapshot")
    header, data = parsed.fields, bytes(parsed.streams["data"][2])
    name = next(iter(learner_state))
    for shape in ([2 ** 33], [2 ** 20, 2 ** 20, 2 ** 20]):
        header["layout"][0] = [name, shape]
        packed = msgpack.packb(header)
        payload = b"RPW2" + struct.pack("<I", len(packed)) + packed + data
        refused(receiver, engine, dataclasses.replace(snap, payload=payload), "does not fit the model")
    # Valid checksums, wrong shapes or names or dtype: refused before the engine sees them.
    wrong = dict(learner_state)
    wrong[name] = wrong[name].reshape(-1)
    refused(receiver, engine, make_snapshot(wrong, 2), "does not fit the model")
    refused(receiver, engine, make_snapshot({**learner_state, "extra.weight": torch.zeros(2).bfloat16()}, 2),
            "does not have")
    refused(receiver, engine, make_snapshot({n: t.float() for n, t in learner_state.items()}, 2),
            "float32, the engine runs in torch.bfloat16")


def test_nan_weights_with_a_valid_checksum_never_reach_the_engine(engine, learner_state, receiver):
    bad = {n: t.clone() for n, t in learner_state.items()}
    name = list(bad)[3]
    bad[name].view(-1)[0] = float("nan")
    refused(receiver, engine, make_snapshot(bad, 2), "non-finite")
    refused(receiver, engine, make_delta(learner_state, bad, 2, 1), "non-finite")
    inf = {n: t.clone() for n, t in learner_state.items()}
    inf[name].view(-1)[-1] = float("inf")
    refused(receiver, engine, make_delta(learner_state, inf, 2, 1), "non-finite")


def test_the_tensor_op_path_refuses_the_same_corruption(engine, learner_state, receiver, monkeypatch):
    """Without the CPU kernels (as on CUDA) the same checks run as tensor ops."""
    from rapid_async.weights import digest

    monkeypatch.setattr(digest, "_kernels", lambda: None)
    new = step(learner_state, 11)
    delta = make_delta(learner_state, new, 2, 1)
    flipped = bytearray(delta.payload)
    flipped[-5] ^= 0x10
    refused(receiver, engine, dataclasses.replace(delta, payload=bytes(flipped)))
    refused(receiver, engine, make_delta(step(learner_state, 12), new, 2, 1), "checksum mismatch")
    refused(receiver, engine, dataclasses.replace(delta, payload=delta.payload[:-9]))
    bad = {n: t.clone() for n, t in new.items()}
    next(iter(bad.values())).view(-1)[1] = float("nan")
    refused(receiver, engine, make_delta(learner_state, bad, 2, 1), "non-finite")
    receiver.apply(delta)
    receiver.commit()
    assert_engine_holds(engine, new)
    assert receiver.buffer_digest() == receiver.state_digest


def test_a_kernel_failure_on_bad_positions_asks_for_a_snapshot(engine, learner_state, receiver, monkeypatch):
    """Defence in depth: positions the decoder let through unsorted are refused by the check."""
    delta = make_delta(learner_state, step(learner_state, 13), 2, 1)
    real = codec.unpack_delta

    def unsorted(*args):
        decoded = real(*args)
        return codec.Delta(decoded.idx.flip(0), decoded.diff.flip(0))

    monkeypatch.setattr(codec, "unpack_delta", unsorted)
    refused(receiver, engine, delta, "unsorted or outside")


def test_large_gaps_that_wrap_the_int64_positions_ask_for_a_snapshot(engine, receiver):
    # Four escaped gaps whose sum wraps 2**64 back to a small last position
    # (10): the old check saw only that last position and the scatter raised
    # IndexError out of apply, which killed the actor. Now: NeedSnapshot.
    k = 4
    big = [2**62, 2**62, 2**62, 2**62 - 4 + 11]
    wrapped = torch.cumsum(torch.tensor(big) + 1, 0) - 1
    assert int(wrapped[-1]) == 10 and int(wrapped[0]) >= receiver.layout.numel  # really wraps
    z = zstandard.ZstdCompressor()
    update = forged_delta(receiver, {"count": k, "large": k},
                          {"gaps": (k, z.compress(bytes([255] * k))),
                           "large": (8 * k, z.compress(struct.pack("<4q", *big))),
                           "values": (2 * k, z.compress(bytes(2 * k)))})
    refused(receiver, engine, update, "changes position")
    # The positions a forged payload decodes to are never used as indices.
    with pytest.raises(codec.PayloadError, match="changes position"):
        codec.decode_streams(torch.tensor([255] * k, dtype=torch.uint8), torch.tensor(big),
                             torch.zeros(2 * k, dtype=torch.uint8), torch.int16, 1000)
