"""Tests for rapid_async.wire.protocol: round trips of every message type and each malformed case."""

from __future__ import annotations

import math

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rapid_async.wire import protocol
from rapid_async.wire.protocol import (
    PROTOCOL_VERSION,
    Rejoin,
    ActorStats,
    DeltaRequest,
    ErrorReply,
    EvalResult,
    EvalTask,
    Heartbeat,
    Hello,
    ProtocolError,
    RolloutGroup,
    SnapshotRequest,
    Stop,
    WeightUpdate,
    Welcome,
    WorkGrant,
    WorkRequest,
    decode,
    encode,
)

text = st.text(max_size=20)
versions = st.integers(min_value=0, max_value=2**40)
scalars = st.one_of(st.integers(-(2**31), 2**31), st.floats(allow_nan=False), text, st.booleans())
flat_dicts = st.dictionaries(text, scalars, max_size=5)
trees = st.recursive(
    st.one_of(st.none(), scalars),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
    max_leaves=10,
)


@st.composite
def rollout_groups(draw) -> RolloutGroup:
    """Random valid RolloutGroup with K in [1, 4], T in [0, 6]."""
    k = draw(st.integers(1, 4))
    t = draw(st.integers(0, 6))
    p = draw(st.integers(1, 5))
    lengths = [draw(st.integers(0, t)) for _ in range(k)]
    ids = torch.zeros(k, t, dtype=torch.int32)
    logprobs = torch.zeros(k, t, dtype=torch.float32)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.tensor(draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n)), dtype=torch.int32)
        lp = draw(st.lists(st.floats(-1e4, 0.0, width=32), min_size=n, max_size=n))
        logprobs[i, :n] = torch.tensor(lp, dtype=torch.float32)
    rewards = draw(st.lists(st.floats(-1e6, 1e6, width=32), min_size=k, max_size=k))
    reasons = draw(st.lists(st.sampled_from(["stop", "length"]), min_size=k, max_size=k))
    return RolloutGroup(
        actor_id=draw(text),
        prompt_id=draw(text),
        policy_version=draw(versions),
        prompt_ids=torch.tensor(draw(st.lists(st.integers(0, 2**31 - 1), min_size=p, max_size=p)), dtype=torch.int32),
        completion_ids=ids,
        completion_lengths=torch.tensor(lengths, dtype=torch.int32),
        logprobs=logprobs,
        rewards=torch.tensor(rewards, dtype=torch.float32),
        finish_reasons=reasons,
        gen_seconds=draw(st.floats(0, 1e6)),
        created_at=draw(st.floats(0, 2e9)),
        info=draw(flat_dicts),
        grant_id=draw(st.integers(0, 2**62)),
    )


weight_updates = st.one_of(
    st.builds(
        WeightUpdate,
        version=versions,
        base_version=st.none(),
        kind=st.just("snapshot"),
        checksum=text,
        dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
        payload=st.binary(max_size=200),
        raw_nbytes=versions,
    ),
    versions.map(
        lambda v: WeightUpdate(
            version=v + 1, base_version=v, kind="delta", checksum="c", dtype="bfloat16", payload=b"\x00x", raw_nbytes=2
        )
    ),
)
simple_messages = st.one_of(
    st.builds(Hello, actor_id=text, pid=st.integers(0, 2**31), engine=text),
    st.builds(Welcome, rollout_endpoint=text, weights_endpoint=text, policy_version=versions,
              settings=st.dictionaries(text, trees, max_size=4)),
    st.builds(SnapshotRequest, actor_id=text, reason=text),
    st.builds(DeltaRequest, actor_id=text, base_version=versions),
    st.builds(ActorStats, actor_id=text, stats=flat_dicts),
    st.builds(Stop, reason=text),
    st.builds(ErrorReply, message=text),
    st.builds(Rejoin, reason=text),
    st.builds(WorkRequest, actor_id=text, max_groups=st.integers(0, 1000)),
    st.builds(WorkGrant, prompt_indices=st.lists(st.integers(0, 2**40), max_size=20), min_version=versions,
              grant_id=st.integers(0, 2**62)),
    st.builds(Heartbeat, actor_id=text, session=text),
    weight_updates,
)


def _valid_group(**overrides) -> RolloutGroup:
    """A fixed valid group: K = 2, T = 3, lengths [3, 1]."""
    fields = dict(
        actor_id="a0",
        prompt_id="p7",
        policy_version=3,
        prompt_ids=torch.tensor([5, 6, 7], dtype=torch.int32),
        completion_ids=torch.tensor([[1, 2, 3], [4, 0, 0]], dtype=torch.int32),
        completion_lengths=torch.tensor([3, 1], dtype=torch.int32),
        logprobs=torch.tensor([[-0.5, -1.0, -0.1], [-2.0, 0.0, 0.0]], dtype=torch.float32),
        rewards=torch.tensor([1.0, 0.0], dtype=torch.float32),
        finish_reasons=["stop", "length"],
        gen_seconds=0.25,
        created_at=1.7e9,
        info={"finish_stop": 2},
    )
    fields.update(overrides)
    return RolloutGroup(**fields)


def _assert_groups_equal(a: RolloutGroup, b: RolloutGroup) -> None:
    for name in ("actor_id", "prompt_id", "policy_version", "finish_reasons", "gen_seconds",
                 "created_at", "info", "grant_id"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("prompt_ids", "completion_ids", "completion_lengths", "logprobs", "rewards"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), name


@settings(max_examples=60, deadline=None)
@given(simple_messages)
def test_simple_messages_round_trip(msg):
    out = decode(encode(msg))
    assert type(out) is type(msg)
    assert out == msg


@settings(max_examples=60, deadline=None)
@given(rollout_groups())
def test_rollout_group_round_trips(group):
    frames = encode(group)
    assert len(frames) == 6  # header + 5 tensors
    _assert_groups_equal(decode(frames), group)


def test_registry_covers_every_message_type():
    assert set(protocol.message_types().values()) == {
        Hello, Welcome, SnapshotRequest, DeltaRequest, WeightUpdate, ActorStats, Stop, ErrorReply,
        RolloutGroup, WorkRequest, WorkGrant, EvalTask, EvalResult, Rejoin, Heartbeat,
    }


def test_delta_request_refuses_a_negative_base_version():
    frames = encode(DeltaRequest(actor_id="a", base_version=3))
    header = msgpack.unpackb(frames[0])
    header["fields"]["base_version"] = -1
    with pytest.raises(ProtocolError, match="base_version.*>= 0"):
        decode([msgpack.packb(header)])


def test_tensor_frames_are_little_endian_raw_bytes():
    frames = encode(_valid_group())
    header = msgpack.unpackb(frames[0])
    assert header["protocol"] == PROTOCOL_VERSION and header["type"] == "rollout_group"
    assert header["tensors"]["completion_ids"] == {"dtype": "<i4", "shape": [2, 3]}
    assert frames[1] == (5).to_bytes(4, "little") + (6).to_bytes(4, "little") + (7).to_bytes(4, "little")


def _reheader(frames: list[bytes], edit) -> list[bytes]:
    header = msgpack.unpackb(frames[0])
    edit(header)
    return [msgpack.packb(header), *frames[1:]]


@pytest.mark.parametrize(
    "frames, match",
    [
        ([], "empty message"),
        ([b"\xc1"], "not valid msgpack"),
        ([msgpack.packb([1, 2])], "must be a msgpack map"),
        ([msgpack.packb({"type": "stop", "fields": {"reason": "x"}, "tensors": {}})], "no 'protocol'"),
        ([msgpack.packb({"protocol": 7, "type": "stop", "fields": {}, "tensors": {}})], f"got 7, expected {PROTOCOL_VERSION}"),
        ([msgpack.packb({"protocol": PROTOCOL_VERSION, "fields": {}, "tensors": {}})], "no 'type'"),
        ([msgpack.packb({"protocol": PROTOCOL_VERSION, "type": "nope", "fields": {}, "tensors": {}})], "unknown message type 'nope'"),
        ([msgpack.packb({"protocol": PROTOCOL_VERSION, "type": "stop", "fields": {}, "tensors": {}})], "fields missing \\['reason'\\]"),
        ([msgpack.packb({"protocol": PROTOCOL_VERSION, "type": "stop", "fields": {"reason": 3}, "tensors": {}})], "'reason' must be a str"),
        ([msgpack.packb({"protocol": PROTOCOL_VERSION, "type": "stop", "fields": [], "tensors": {}})], "'fields' must be a map"),
        ([b"\x80" + b"x" * (protocol.MAX_HEADER_BYTES + 1)], "more than MAX_HEADER_BYTES"),
        ([*encode(Stop("x")), b"extra"], "wrong number of frames: got 2, expected 1"),
    ],
)
def test_malformed_headers_raise_protocol_error(frames, match):
    with pytest.raises(ProtocolError, match=match):
        decode(frames)


def test_deeply_nested_settings_are_refused():
    nested: list = []
    for _ in range(900):
        nested = [nested]
    header = {"protocol": PROTOCOL_VERSION, "type": "welcome", "tensors": {}, "fields": {
        "rollout_endpoint": "a", "weights_endpoint": "b", "policy_version": 0, "settings": {"x": nested},
        "session": ""}}
    with pytest.raises(ProtocolError, match="nested more than 16 levels"):
        decode([msgpack.packb(header)])


def test_protocol_error_is_a_value_error():
    assert issubclass(ProtocolError, ValueError)


def test_bool_is_not_an_int_and_ext_types_are_rejected():
    frames = _reheader(encode(Hello("a", 1, "hf")), lambda h: h["fields"].update(pid=True))
    with pytest.raises(ProtocolError, match="'pid' must be an int"):
        decode(frames)
    frames = _reheader(encode(ActorStats("a", {})), lambda h: h["fields"].update(stats={"x": msgpack.ExtType(1, b"")}))
    with pytest.raises(ProtocolError, match="stats"):
        decode(frames)


def test_weight_update_kind_and_base_version_must_agree():
    bad = WeightUpdate(version=3, base_version=2, kind="snapshot", checksum="c", dtype="float32", payload=b"", raw_nbytes=0)
    with pytest.raises(ProtocolError, match="base_version must be None"):
        encode(bad)
    good = encode(WeightUpdate(3, None, "snapshot", "c", "float32", b"", 0))
    with pytest.raises(ProtocolError, match="must be one of"):
        decode(_reheader(good, lambda h: h["fields"].update(kind="diff")))
    with pytest.raises(ProtocolError, match="must be < version"):
        encode(WeightUpdate(3, 3, "delta", "c", "float32", b"", 0))


def test_weight_payload_travels_as_its_own_frame():
    frames = encode(WeightUpdate(1, 0, "delta", "abc", "bfloat16", b"PAYLOAD", 7))
    assert frames[1] == b"PAYLOAD"
    assert decode(frames).payload == b"PAYLOAD"


def test_tensor_frame_size_must_match_shape():
    frames = encode(_valid_group())
    frames[2] = frames[2][:-4]  # completion_ids loses one element
    with pytest.raises(ProtocolError, match="'completion_ids': frame has 20 bytes, shape \\[2, 3\\] and dtype <i4 need 24"):
        decode(frames)


def test_tensor_dtype_must_be_allowed_and_expected():
    frames = encode(_valid_group())
    bad = _reheader(frames, lambda h: h["tensors"]["rewards"].update(dtype="|O"))
    with pytest.raises(ProtocolError, match="dtype '\\|O' is not allowed"):
        decode(bad)
    bad = _reheader(frames, lambda h: h["tensors"]["rewards"].update(dtype="<i4"))
    with pytest.raises(ProtocolError, match="'rewards': dtype '<i4' is wrong, expected '<f4'"):
        decode(bad)
    bad = _reheader(frames, lambda h: h["tensors"]["rewards"].update(shape=[-2]))
    with pytest.raises(ProtocolError, match="shape must be a list of ints >= 0"):
        decode(bad)
    with pytest.raises(ProtocolError, match="'rewards' must have dtype torch.float32"):
        encode(_valid_group(rewards=torch.tensor([1.0, 0.0], dtype=torch.float64)))


def test_reshaped_tensor_with_right_byte_count_is_caught_by_shape_rules():
    # logprobs (2, 3) sent as (3, 2): same bytes, inconsistent with completion_ids.
    frames = _reheader(encode(_valid_group()), lambda h: h["tensors"]["logprobs"].update(shape=[3, 2]))
    with pytest.raises(ProtocolError, match="logprobs shape \\(3, 2\\) != completion_ids shape \\(2, 3\\)"):
        decode(frames)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(completion_ids=torch.zeros(0, 3, dtype=torch.int32), logprobs=torch.zeros(0, 3),
              completion_lengths=torch.zeros(0, dtype=torch.int32), rewards=torch.zeros(0)), "K >= 1"),
        (dict(prompt_ids=torch.zeros(1, 3, dtype=torch.int32)), "prompt_ids must be 1-D"),
        (dict(completion_ids=torch.zeros(6, dtype=torch.int32)), "completion_ids must be 2-D"),
        (dict(rewards=torch.tensor([1.0, 0.0, 0.5])), "rewards shape \\(3,\\) != \\(K,\\)"),
        (dict(completion_lengths=torch.tensor([3], dtype=torch.int32)), "completion_lengths shape"),
        (dict(completion_lengths=torch.tensor([4, 1], dtype=torch.int32)), "must be in \\[0, T=3\\]"),
        (dict(completion_lengths=torch.tensor([-1, 1], dtype=torch.int32)), "must be in \\[0, T=3\\]"),
        (dict(logprobs=torch.tensor([[-0.5, math.nan, -0.1], [-2.0, 0.0, 0.0]])), "finite and <= 0"),
        (dict(logprobs=torch.tensor([[-0.5, -math.inf, -0.1], [-2.0, 0.0, 0.0]])), "finite and <= 0"),
        (dict(logprobs=torch.tensor([[-0.5, 0.01, -0.1], [-2.0, 0.0, 0.0]])), "finite and <= 0"),
        (dict(logprobs=torch.tensor([[-0.5, -1.0, -0.1], [-2.0, -0.3, 0.0]])), "0 in the padding"),
        (dict(completion_ids=torch.tensor([[1, 2, 3], [4, 9, 0]], dtype=torch.int32)), "0 in the padding"),
        (dict(completion_ids=torch.tensor([[1, -2, 3], [4, 0, 0]], dtype=torch.int32)), "token ids must be >= 0"),
        (dict(rewards=torch.tensor([math.nan, 0.0])), "rewards must be finite"),
        (dict(rewards=torch.tensor([math.inf, 0.0])), "rewards must be finite"),
        (dict(finish_reasons=["stop"]), "finish_reasons must be K = 2 values"),
        (dict(finish_reasons=["stop", "eos"]), "finish_reasons must be K = 2 values"),
        (dict(finish_reasons="stop"), "'finish_reasons' must be a list of str"),
        (dict(gen_seconds=-1.0), "gen_seconds must be >= 0"),
        (dict(created_at=math.inf), "'created_at' must be finite"),
        (dict(policy_version=-1), "'policy_version' must be >= 0"),
        (dict(info={"nested": {"a": 1}}), "'info'\\['nested'\\] must be a str/int/float/bool"),
        (dict(actor_id=None), "'actor_id' must be a str"),
        (dict(prompt_ids=[1, 2]), "'prompt_ids' must be a torch.Tensor"),
    ],
)
def test_invalid_rollout_groups_are_refused_by_encode_and_decode(overrides, match):
    bad = _valid_group(**overrides)
    with pytest.raises(ProtocolError, match=match):
        encode(bad)
    # Build the same bad frames by hand (bypassing encode's checks) where possible.
    try:
        frames = _unchecked_encode(bad)
    except (AttributeError, TypeError, KeyError):
        return  # not even representable on the wire (e.g. a list instead of a tensor)
    with pytest.raises(ProtocolError, match=match):
        decode(frames)


def _unchecked_encode(group: RolloutGroup) -> list[bytes]:
    """Frames for a group exactly as a buggy sender would produce them (no checks)."""
    good = _valid_group()
    spec_tensors = ["prompt_ids", "completion_ids", "completion_lengths", "logprobs", "rewards"]
    names = ["actor_id", "prompt_id", "policy_version", "finish_reasons", "gen_seconds",
             "created_at", "info", "grant_id", "session_tag"]
    header = {
        "protocol": PROTOCOL_VERSION,
        "type": "rollout_group",
        "fields": {n: getattr(group, n) for n in names},
        "tensors": {n: {"dtype": "<i4" if getattr(good, n).dtype == torch.int32 else "<f4",
                        "shape": list(getattr(group, n).shape)} for n in spec_tensors},
    }
    frames = [msgpack.packb(header)]
    for n in spec_tensors:
        frames.append(getattr(group, n).to(getattr(good, n).dtype).numpy().tobytes())
    return frames


def test_encode_refuses_non_messages():
    with pytest.raises(ProtocolError, match="cannot encode a dict"):
        encode({"type": "stop"})


# ---------------------------------------------------------------- evaluation messages

eval_tasks = st.builds(
    EvalTask, job_id=versions, kind=st.sampled_from(["start", "periodic", "final"]),
    min_version=versions, problems=st.integers(1, 10_000), samples=st.integers(0, 64),
    temperature=st.floats(0.01, 10.0), max_new_tokens=st.integers(1, 4096),
    seed=st.integers(-(2**31), 2**31))
eval_results = st.builds(
    EvalResult, actor_id=text, job_id=versions, policy_version=versions,
    metrics=st.dictionaries(text, st.floats(0.0, 1.0), max_size=5).map(
        lambda d: {**d, "success": 0.5}),
    error=st.just(""))


@settings(max_examples=40, deadline=None)
@given(st.one_of(eval_tasks, eval_results))
def test_eval_messages_round_trip(msg):
    assert decode(encode(msg)) == msg


def _task(**overrides) -> EvalTask:
    fields = dict(job_id=1, kind="periodic", min_version=25, problems=200, samples=4,
                  temperature=1.0, max_new_tokens=6, seed=0)
    fields.update(overrides)
    return EvalTask(**fields)


@pytest.mark.parametrize("overrides, match", [
    (dict(kind="sometimes"), "'kind' must be one of"),
    (dict(problems=0), "problems \\(0\\) and max_new_tokens"),
    (dict(max_new_tokens=0), "must be >= 1"),
    (dict(temperature=0.0), "temperature must be > 0 with samples > 0"),
    (dict(temperature=math.nan), "'temperature' must be finite"),
    (dict(min_version=-1), "'min_version' must be >= 0"),
])
def test_invalid_eval_tasks_are_refused(overrides, match):
    with pytest.raises(ProtocolError, match=match):
        encode(_task(**overrides))
    frames = _reheader(encode(_task()), lambda h: h["fields"].update(overrides))
    with pytest.raises(ProtocolError, match=match):
        decode(frames)


def test_greedy_only_eval_task_may_have_temperature_zero():
    assert decode(encode(_task(samples=0, temperature=0.0))).samples == 0


@pytest.mark.parametrize("metrics, match", [
    ({"success": 1.5}, "metrics\\['success'\\] = 1.5 must be in \\[0, 1\\]"),
    ({"success": 0.5, "pass@4": -0.1}, "'pass@4'"),
    ({"seconds": 3.0}, "need 'success' or a 'pass@k'"),
    ({"success": math.inf}, "must be finite"),
    ({"success": "high"}, "must be a float"),
    ({"success": True}, "must be a float"),
])
def test_invalid_eval_results_are_refused(metrics, match):
    good = EvalResult("a0", 3, 25, {"success": 0.5}, "")
    with pytest.raises(ProtocolError, match=match):
        decode(_reheader(encode(good), lambda h: h["fields"].update(metrics=metrics)))
    with pytest.raises(ProtocolError, match=match):
        encode(EvalResult("a0", 3, 25, metrics, ""))


def test_failed_eval_result_carries_its_error_and_no_metrics():
    out = decode(encode(EvalResult("a0", 3, 25, {}, "engine ran out of memory")))
    assert out.error == "engine ran out of memory" and out.metrics == {}


def test_rejoin_reason_must_be_a_string():
    frames = encode(Rejoin(reason="restarted"))
    header = msgpack.unpackb(frames[0])
    header["fields"]["reason"] = 7
    with pytest.raises(ProtocolError, match="field 'reason' must be a str"):
        decode([msgpack.packb(header)])
def test_ints_must_fit_in_64_bit_signed():
    # msgpack carries uint64; 2**64 - 1 as a policy version overflowed the
    # learner's int64 collate before this check.
    frames = _reheader(encode(_valid_group()), lambda h: h["fields"].update(policy_version=2**64 - 1))
    with pytest.raises(ProtocolError, match="'policy_version'.*64-bit"):
        decode(frames)
    assert decode(encode(_valid_group(policy_version=2**63 - 1))).policy_version == 2**63 - 1


def test_grant_id_and_session_travel_and_are_checked():
    assert decode(encode(_valid_group(grant_id=2**62))).grant_id == 2**62
    assert decode(encode(WorkGrant([3, 4], 1, grant_id=99))) == WorkGrant([3, 4], 1, 99)
    assert decode(encode(Heartbeat("a0", "s3cret"))) == Heartbeat("a0", "s3cret")
    with pytest.raises(ProtocolError, match="'grant_id' must be >= 0"):
        encode(_valid_group(grant_id=-1))
    frames = _reheader(encode(Heartbeat("a0", "s")), lambda h: h["fields"].pop("session"))
    with pytest.raises(ProtocolError, match="missing \\['session'\\]"):
        decode(frames)


# ---------------------------------------------------------------- per-token versions (in-flight)

def _runs(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def test_version_runs_round_trip_and_expand_to_per_token_versions():
    # lengths [3, 1]: completion 0 has 2 tokens of version 3 then 1 of version 5
    group = _valid_group(version_runs=_runs([[0, 3, 2], [0, 5, 1], [1, 4, 1]]))
    back = decode(encode(group))
    _assert_groups_equal(group, back)
    assert torch.equal(back.version_runs, group.version_runs)
    assert back.token_versions().tolist() == [[3, 3, 5], [4, 0, 0]]
    assert back.newest_version() == 5
    plain = decode(encode(_valid_group()))  # without runs: every token is policy_version's
    assert plain.version_runs is None
    assert plain.token_versions().tolist() == [[3, 3, 3], [3, 0, 0]]


@pytest.mark.parametrize("rows, match", [
    ([[0, 3, 3]], "tokens covered per completion \\[3, 0\\] != completion_lengths \\[3, 1\\]"),
    ([[0, 3, 2], [0, 5, 2], [1, 3, 1]], "tokens covered"),
    ([[0, 5, 2], [0, 3, 1], [1, 3, 1]], "must strictly increase"),
    ([[0, 3, 2], [0, 3, 1], [1, 3, 1]], "must strictly increase"),
    ([[0, 3, 3], [2, 3, 1]], "outside \\[0, 2\\)"),
    ([[1, 3, 1], [0, 3, 3]], "out of order"),
    ([[0, 3, 3], [1, 3, 0], [1, 4, 1]], "count >= 1"),
    ([[0, 4, 3], [1, 5, 1]], "oldest token's version 4 must be the group's policy_version 3"),
    ([[0, 3, 3, 1]], "must be \\(R, 3\\)"),
])
def test_malformed_version_runs_are_refused_by_encode_and_decode(rows, match):
    bad = _valid_group(version_runs=_runs(rows))
    with pytest.raises(ProtocolError, match=match):
        encode(bad)
    frames = encode(_valid_group(version_runs=_runs([[0, 3, 3], [1, 3, 1]])))
    header = msgpack.unpackb(frames[0])
    header["tensors"]["version_runs"]["shape"] = list(bad.version_runs.shape)
    frames[0] = msgpack.packb(header)
    frames[-1] = bad.version_runs.numpy().tobytes()
    with pytest.raises(ProtocolError, match=match):
        decode(frames)


def test_version_runs_must_be_int64():
    group = _valid_group(version_runs=torch.tensor([[0, 3, 3], [1, 3, 1]], dtype=torch.int32))
    with pytest.raises(ProtocolError, match="'version_runs' must have dtype torch.int64"):
        encode(group)
