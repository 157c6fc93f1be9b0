"""The wire format: every message that actors and the learner exchange.

Used by both processes (through `rapid_async.wire.transport`); this is the only
module that knows how a message looks on the wire.

A message is a ZeroMQ multipart message: one msgpack header frame, then one raw
frame per tensor field, then one raw frame per bytes field, in the order the
message type declares them::

    frame 0      msgpack map {"protocol": 3, "type": "<tag>",
                              "fields": {scalar fields...},
                              "tensors": {name: {"dtype": "<i4", "shape": [K, T]}}}
    frame 1..n   raw little-endian tensor bytes (C order), one per tensor field
    frame n+1..  raw bytes fields (e.g. the weight payload)

Never pickle: headers are msgpack (plain maps, lists, str, numbers), tensors are
raw buffers whose dtype comes from a small allowlist. `decode` checks the
protocol version, the type tag, the frame count, every field's type and the
tensors' sizes and shapes, and the value rules of each message (e.g. rewards in
[0, 1]), raising `ProtocolError` that names the problem. `encode` runs the same
checks, so a bad message is caught at the sender too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable

import msgpack
import numpy as np
import torch

PROTOCOL_VERSION = 4  # 3: RolloutGroup.session_tag; 4: RolloutGroup.version_runs
MAX_HEADER_BYTES = 64 * 1024
MAX_NESTING = 16  # deepest list / dict nesting allowed in Welcome.settings

# Tensor dtypes allowed on the wire: header name -> (little-endian numpy dtype, torch dtype).
WIRE_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "<i4": (np.dtype("<i4"), torch.int32),
    "<i8": (np.dtype("<i8"), torch.int64),
    "<f4": (np.dtype("<f4"), torch.float32),
}
_TORCH_TO_WIRE = {torch_dtype: name for name, (_, torch_dtype) in WIRE_DTYPES.items()}


class ProtocolError(ValueError):
    """A message that does not follow the wire format; the text names the problem."""


# ---------------------------------------------------------------- messages


@dataclass
class Hello:
    """Actor -> learner (control): the first message of an actor. `session`
    is empty, or the secret of the session this actor already holds with this
    learner: it proves that a Hello from a new connection (an actor that
    reconnected) comes from the same actor, not from one reusing its id."""

    actor_id: str
    pid: int
    engine: str
    session: str = ""


@dataclass
class Welcome:
    """Learner -> actor (control): the reply to Hello.

    `settings` is a msgpack-able dict of run settings (str keys; str, int,
    float, bool, None, list and dict values). `session` is a secret the
    learner gives this actor; the actor's heartbeats carry it (they come from
    another socket, so the learner cannot tell the sender by its connection).
    """

    rollout_endpoint: str
    weights_endpoint: str
    policy_version: int
    settings: dict
    session: str = ""


@dataclass
class Heartbeat:
    """Actor -> learner (control, from the actor's heartbeat thread and socket):
    still alive, also while generating. No reply."""

    actor_id: str
    session: str


@dataclass
class SnapshotRequest:
    """Actor -> learner (control): please send the full weights."""

    actor_id: str
    reason: str


@dataclass
class WeightUpdate:
    """Learner -> actor (weights PUB, or control reply): weights at `version`.

    `kind` is "snapshot" (base_version None) or "delta" (against base_version).
    `payload` is the encoded weights (format and size checks in
    `rapid_async.weights.codec`), `raw_nbytes` their size before compression,
    `dtype` the inference dtype name, and `checksum` the certificate of
    `rapid_async.weights.digest`: a sha256 that binds kind, version,
    base_version, dtype and tensor layout to the per-tensor digests of the
    weights after applying (and, for a snapshot, the sha256 of its bytes).
    """

    version: int
    base_version: int | None
    kind: str
    checksum: str
    dtype: str
    payload: bytes
    raw_nbytes: int


@dataclass
class DeltaRequest:
    """Actor -> learner (control): the published delta whose base is `base_version`.

    An actor that missed deltas (its weights queue was full) catches up from
    the learner's chain of recent deltas. Reply: that WeightUpdate, or an
    ErrorReply when it is no longer kept (then ask for a snapshot).
    """

    actor_id: str
    base_version: int


@dataclass
class ActorStats:
    """Actor -> learner (control): a flat dict of str -> float / int / str / bool."""

    actor_id: str
    stats: dict


@dataclass
class Stop:
    """Learner -> actor (control): stop generating and exit."""

    reason: str


@dataclass
class WorkRequest:
    """Actor -> learner (control): give me up to `max_groups` prompts."""

    actor_id: str
    max_groups: int


@dataclass
class WorkGrant:
    """Learner -> actor (control): the reply to WorkRequest.

    `prompt_indices` are indices into the task's training stream (possibly
    empty: no work right now); the actor must generate them with weights of
    version >= `min_version` and put `grant_id` in each group it sends back.
    """

    prompt_indices: list
    min_version: int
    grant_id: int = 0


@dataclass
class Rejoin:
    """Learner -> actor (control): the reply to a request from an actor this
    learner has not welcomed, e.g. after the learner restarted from a
    checkpoint. The actor says Hello again and takes a snapshot before it
    generates: its weights may be ahead of or behind the restored version."""

    reason: str


@dataclass
class ErrorReply:
    """Learner -> actor (control): the request could not be served."""

    message: str


@dataclass
class EvalTask:
    """Learner -> actor (control, just before the WorkGrant it comes with):
    evaluate the held-out set with weights of version >= `min_version`.

    `kind` is "start", "periodic" or "final"; `problems` held-out problems,
    greedy plus `samples` sampled completions each (at `temperature`, seeded
    with `seed`), at most `max_new_tokens` tokens. The actor answers with an
    EvalResult naming the version it actually evaluated.
    """

    job_id: int
    kind: str
    min_version: int
    problems: int
    samples: int
    temperature: float
    max_new_tokens: int
    seed: int


@dataclass
class EvalResult:
    """Actor -> learner (control): the outcome of EvalTask `job_id`.

    `policy_version` is the version whose weights were evaluated (>= the
    task's min_version). `metrics` is the evaluation summary, a flat dict of
    str -> finite number ("success", "mean_reward", "pass@k", "seconds", ...;
    success and pass@k in [0, 1]); empty with `error` set when it failed.
    """

    actor_id: str
    job_id: int
    policy_version: int
    metrics: dict
    error: str


@dataclass(eq=False)
class RolloutGroup:
    """Actor -> learner (rollouts): K completions of one prompt, with rewards.

    Attributes:
        actor_id: the actor that generated the group.
        prompt_id: the task's id of the prompt.
        policy_version: the weight version that generated the group's oldest
            token (every token, unless `version_runs` says otherwise); the
            learner's staleness of the group is measured from it.
        prompt_ids: (P,) int32 prompt token ids.
        completion_ids: (K, T) int32 completion token ids, right-padded with 0.
        completion_lengths: (K,) int32 number of real tokens in each row (<= T).
        logprobs: (K, T) float32 behaviour log-probs (<= 0), 0 in padding.
        rewards: (K,) float32 rewards, any finite values (tasks may give
            e.g. -1 for a format error).
        finish_reasons: K strings, why each completion ended: "stop" (EOS or
            a stop string) or "length" (cut at max_new_tokens; the learner
            treats these as `algo.truncated` says).
        gen_seconds: time spent generating the group.
        created_at: unix time when the group was finished.
        info: small flat dict of str -> scalar (e.g. finish reasons counts).
        grant_id: the WorkGrant this group answers (0: none).
        session_tag: proof that the actor's session sent it: an HMAC, keyed
            with the session secret of its Welcome, of actor id, prompt id
            and grant id (`wire.security.rollout_tag`; ActorSockets adds it).
            Grant ids are logged and recorded; the secret is not.
        loss_mask: optional (K, T) int32, multi-turn episodes only: 1 on the
            tokens the model generated, 0 on environment / tool tokens (in the
            context, not trained); logprobs are 0 where it is 0. None (not
            sent): every completion token is the model's (one turn).
        version_runs: optional (R, 3) int64, in-flight weight updates only:
            run-length per-token policy versions, one row [k, version, count]
            per run of `count` consecutive tokens of completion k generated
            with weights `version`; rows of each completion in order, in
            completion order, versions strictly increasing within a
            completion, counts summing to its length, and the smallest
            version equal to `policy_version`. None (not sent): every token
            is `policy_version`'s.
    """

    actor_id: str
    prompt_id: str
    policy_version: int
    prompt_ids: torch.Tensor
    completion_ids: torch.Tensor
    completion_lengths: torch.Tensor
    logprobs: torch.Tensor
    rewards: torch.Tensor
    finish_reasons: list
    gen_seconds: float
    created_at: float
    info: dict
    grant_id: int = 0
    session_tag: str = ""
    loss_mask: torch.Tensor | None = None
    version_runs: torch.Tensor | None = None

    def token_versions(self) -> torch.Tensor:
        """(K, T) int64 policy version of every completion token (0 in the padding)."""
        k, t = self.completion_ids.shape
        out = torch.zeros((k, t), dtype=torch.int64)
        if self.version_runs is None:
            for row, n in enumerate(self.completion_lengths.tolist()):
                out[row, :n] = self.policy_version
            return out
        filled = [0] * k
        for row, version, count in self.version_runs.tolist():
            out[row, filled[row]:filled[row] + count] = version
            filled[row] += count
        return out

    def newest_version(self) -> int:
        """The newest policy version among the group's tokens."""
        if self.version_runs is None or not self.version_runs.numel():
            return self.policy_version
        return int(self.version_runs[:, 1].max())


FINISH_REASONS = ("stop", "length")
"""Why a completion ended: EOS or a stop string, or the max_new_tokens cap."""


Message = (Hello | Welcome | Heartbeat | SnapshotRequest | DeltaRequest | WeightUpdate | ActorStats
           | Stop | ErrorReply | RolloutGroup | WorkRequest | WorkGrant | EvalTask | EvalResult
           | Rejoin)

# ---------------------------------------------------------------- field checkers
# Each checker takes (field name, value) and returns the value to store, or raises.


def _str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"field {name!r} must be a str, got {type(value).__name__}")
    return value


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"field {name!r} must be an int, got {type(value).__name__}")
    if not -(2**63) <= value < 2**63:
        raise ProtocolError(f"field {name!r} = {value} does not fit in 64-bit signed int")
    return value


def _nonneg_int(name: str, value: Any) -> int:
    if _int(name, value) < 0:
        raise ProtocolError(f"field {name!r} must be >= 0, got {value}")
    return value


def _opt_nonneg_int(name: str, value: Any) -> int | None:
    return None if value is None else _nonneg_int(name, value)


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"field {name!r} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ProtocolError(f"field {name!r} must be finite, got {value}")
    return float(value)


def _bytes(name: str, value: Any) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"field {name!r} must be bytes, got {type(value).__name__}")
    return bytes(value)


def _flat_dict(name: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise ProtocolError(f"field {name!r} must be a dict, got {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(key, str):
            raise ProtocolError(f"field {name!r} must have str keys, got {key!r}")
        if not isinstance(item, (str, int, float, bool)):
            raise ProtocolError(
                f"field {name!r}[{key!r}] must be a str/int/float/bool, got {type(item).__name__}"
            )
    return value


def _number_dict(name: str, value: Any) -> dict:
    if not isinstance(value, dict) or len(value) > 256:
        raise ProtocolError(f"field {name!r} must be a dict of at most 256 entries")
    for key, item in value.items():
        if not isinstance(key, str):
            raise ProtocolError(f"field {name!r} must have str keys, got {key!r}")
        _float(f"{name}[{key!r}]", item)
    return value


def _index_list(name: str, value: Any) -> list:
    if not isinstance(value, (list, tuple)) or len(value) > 1_000_000:
        raise ProtocolError(f"field {name!r} must be a list of ints, got {type(value).__name__}")
    return [_nonneg_int(name, item) for item in value]


def _str_list(name: str, value: Any) -> list:
    if not isinstance(value, (list, tuple)) or len(value) > 1_000_000:
        raise ProtocolError(f"field {name!r} must be a list of str, got {type(value).__name__}")
    return [_str(name, item) for item in value]


def _tree(name: str, value: Any, depth: int = 0) -> Any:
    if depth > MAX_NESTING:
        raise ProtocolError(f"field {name!r} is nested more than {MAX_NESTING} levels deep")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_tree(name, item, depth + 1) for item in value]
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise ProtocolError(f"field {name!r} must have str keys only")
        return {key: _tree(name, item, depth + 1) for key, item in value.items()}
    raise ProtocolError(f"field {name!r} holds a {type(value).__name__}, which is not allowed")


def _tree_dict(name: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise ProtocolError(f"field {name!r} must be a dict, got {type(value).__name__}")
    return _tree(name, value)


def _choice(*allowed: str) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if _str(name, value) not in allowed:
            raise ProtocolError(f"field {name!r} must be one of {allowed}, got {value!r}")
        return value

    return check


# ---------------------------------------------------------------- value rules


def _check_weight_update(msg: WeightUpdate) -> None:
    if (msg.kind == "snapshot") != (msg.base_version is None):
        raise ProtocolError("WeightUpdate: base_version must be None for a snapshot and an int for a delta")
    if msg.kind == "delta" and msg.base_version >= msg.version:
        raise ProtocolError(f"WeightUpdate: base_version {msg.base_version} must be < version {msg.version}")


def _check_rollout_group(msg: RolloutGroup) -> None:
    if msg.prompt_ids.dim() != 1:
        raise ProtocolError(f"prompt_ids must be 1-D (P,), got shape {tuple(msg.prompt_ids.shape)}")
    if msg.completion_ids.dim() != 2:
        raise ProtocolError(f"completion_ids must be 2-D (K, T), got shape {tuple(msg.completion_ids.shape)}")
    k, t = msg.completion_ids.shape
    if k < 1:
        raise ProtocolError("completion_ids must hold K >= 1 completions, got K = 0")
    if tuple(msg.logprobs.shape) != (k, t):
        raise ProtocolError(f"logprobs shape {tuple(msg.logprobs.shape)} != completion_ids shape {(k, t)}")
    for name in ("completion_lengths", "rewards"):
        shape = tuple(getattr(msg, name).shape)
        if shape != (k,):
            raise ProtocolError(f"{name} shape {shape} != (K,) = {(k,)}")
    if (msg.prompt_ids < 0).any() or (msg.completion_ids < 0).any():
        raise ProtocolError("token ids must be >= 0")
    lengths = msg.completion_lengths
    if (lengths < 0).any() or (lengths > t).any():
        raise ProtocolError(f"completion_lengths must be in [0, T={t}], got {lengths.tolist()}")
    if not torch.isfinite(msg.logprobs).all() or (msg.logprobs > 0).any():
        raise ProtocolError("logprobs must be finite and <= 0")
    padding = torch.arange(t).unsqueeze(0) >= lengths.unsqueeze(1)  # (K, T)
    if (msg.completion_ids[padding] != 0).any() or (msg.logprobs[padding] != 0).any():
        raise ProtocolError("completion_ids and logprobs must be 0 in the padding (positions >= length)")
    if not torch.isfinite(msg.rewards).all():
        raise ProtocolError(f"rewards must be finite, got {msg.rewards.tolist()}")
    reasons = msg.finish_reasons
    if len(reasons) != k or any(r not in FINISH_REASONS for r in reasons):
        raise ProtocolError(f"finish_reasons must be K = {k} values from {FINISH_REASONS}, "
                            f"got {list(reasons)[:8]!r}")
    if msg.gen_seconds < 0:
        raise ProtocolError(f"gen_seconds must be >= 0, got {msg.gen_seconds}")
    if msg.loss_mask is not None:
        _check_loss_mask(msg.loss_mask, msg.logprobs, padding)
    if msg.version_runs is not None:
        _check_version_runs(msg.version_runs, lengths.tolist(), msg.policy_version)


def _check_version_runs(runs: torch.Tensor, lengths: list[int], policy_version: int) -> None:
    """Per-token versions as runs [k, version, count]: completions in order,
    each covered exactly by runs of strictly increasing versions (weights only
    move forward during a generation), the oldest equal to policy_version."""
    if runs.dim() != 2 or runs.shape[1] != 3 or runs.shape[0] < 1:
        raise ProtocolError(f"version_runs must be (R, 3) rows [k, version, count] with R >= 1, "
                            f"got shape {tuple(runs.shape)}")
    covered, last, previous_row = [0] * len(lengths), [-1] * len(lengths), -1
    for row, version, count in runs.tolist():
        if not 0 <= row < len(lengths) or row < previous_row:
            raise ProtocolError(f"version_runs: completion index {row} is outside [0, "
                                f"{len(lengths)}) or out of order")
        if version < 0 or count < 1:
            raise ProtocolError(f"version_runs: run {[row, version, count]} needs version >= 0 "
                                "and count >= 1")
        if version <= last[row]:
            raise ProtocolError(f"version_runs: versions of completion {row} must strictly "
                                f"increase, got {version} after {last[row]}")
        covered[row] += count
        last[row], previous_row = version, row
    if covered != lengths:
        raise ProtocolError(f"version_runs: tokens covered per completion {covered} != "
                            f"completion_lengths {lengths}")
    oldest = int(runs[:, 1].min())
    if oldest != policy_version:
        raise ProtocolError(f"version_runs: the oldest token's version {oldest} must be the "
                            f"group's policy_version {policy_version}")


def _check_loss_mask(mask: torch.Tensor, logprobs: torch.Tensor, padding: torch.Tensor) -> None:
    """A multi-turn group's loss mask: (K, T) 0/1, 0 in the padding, at least
    one model token per row, behaviour log-probs 0 on the env tokens."""
    if tuple(mask.shape) != tuple(logprobs.shape):
        raise ProtocolError(f"loss_mask shape {tuple(mask.shape)} != completion_ids shape "
                            f"{tuple(logprobs.shape)}")
    if not ((mask == 0) | (mask == 1)).all():
        raise ProtocolError("loss_mask must hold only 0 (env token) and 1 (model token)")
    if (mask[padding] != 0).any():
        raise ProtocolError("loss_mask must be 0 in the padding (positions >= length)")
    if (mask.sum(dim=1) < 1).any():
        raise ProtocolError("loss_mask needs at least one model token (1) in every row")
    if (logprobs[mask == 0] != 0).any():
        raise ProtocolError("logprobs must be 0 where loss_mask is 0 (env tokens have no "
                            "behaviour log-prob)")


def _check_eval_task(msg: EvalTask) -> None:
    if msg.problems < 1 or msg.max_new_tokens < 1:
        raise ProtocolError(f"EvalTask: problems ({msg.problems}) and max_new_tokens "
                            f"({msg.max_new_tokens}) must be >= 1")
    if msg.samples and msg.temperature <= 0:
        raise ProtocolError(f"EvalTask: temperature must be > 0 with samples > 0, got {msg.temperature}")


def _check_eval_result(msg: EvalResult) -> None:
    if msg.error:
        return
    if "success" not in msg.metrics and not any(k.startswith("pass@") for k in msg.metrics):
        raise ProtocolError("EvalResult: metrics need 'success' or a 'pass@k' (or set error)")
    for key, value in msg.metrics.items():
        if (key == "success" or key.startswith("pass@")) and not 0 <= value <= 1:
            raise ProtocolError(f"EvalResult: metrics[{key!r}] = {value} must be in [0, 1]")


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Spec:
    """How one message type travels: its tag, field checkers, tensor and bytes fields."""

    tag: str
    cls: type
    scalars: dict[str, Callable[[str, Any], Any]]
    tensors: dict[str, torch.dtype]
    blobs: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None
    optional: tuple[str, ...] = ()
    """Tensor fields that may be None: then they are not sent (no frame)."""


_SPECS = [
    _Spec("hello", Hello, {"actor_id": _str, "pid": _int, "engine": _str, "session": _str}, {}),
    _Spec(
        "welcome",
        Welcome,
        {"rollout_endpoint": _str, "weights_endpoint": _str, "policy_version": _nonneg_int, "settings": _tree_dict,
         "session": _str},
        {},
    ),
    _Spec("heartbeat", Heartbeat, {"actor_id": _str, "session": _str}, {}),
    _Spec("snapshot_request", SnapshotRequest, {"actor_id": _str, "reason": _str}, {}),
    _Spec("delta_request", DeltaRequest, {"actor_id": _str, "base_version": _nonneg_int}, {}),
    _Spec(
        "weight_update",
        WeightUpdate,
        {
            "version": _nonneg_int,
            "base_version": _opt_nonneg_int,
            "kind": _choice("snapshot", "delta"),
            "checksum": _str,
            "dtype": _str,
            "raw_nbytes": _nonneg_int,
        },
        {},
        blobs=("payload",),
        check=_check_weight_update,
    ),
    _Spec("actor_stats", ActorStats, {"actor_id": _str, "stats": _flat_dict}, {}),
    _Spec("stop", Stop, {"reason": _str}, {}),
    _Spec("work_request", WorkRequest, {"actor_id": _str, "max_groups": _nonneg_int}, {}),
    _Spec("work_grant", WorkGrant, {"prompt_indices": _index_list, "min_version": _nonneg_int,
                                    "grant_id": _nonneg_int}, {}),
    _Spec("error", ErrorReply, {"message": _str}, {}),
    _Spec("rejoin", Rejoin, {"reason": _str}, {}),
    _Spec(
        "eval_task",
        EvalTask,
        {
            "job_id": _nonneg_int,
            "kind": _choice("start", "periodic", "final"),
            "min_version": _nonneg_int,
            "problems": _nonneg_int,
            "samples": _nonneg_int,
            "temperature": _float,
            "max_new_tokens": _nonneg_int,
            "seed": _int,
        },
        {},
        check=_check_eval_task,
    ),
    _Spec(
        "eval_result",
        EvalResult,
        {"actor_id": _str, "job_id": _nonneg_int, "policy_version": _nonneg_int,
         "metrics": _number_dict, "error": _str},
        {},
        check=_check_eval_result,
    ),
    _Spec(
        "rollout_group",
        RolloutGroup,
        {
            "actor_id": _str,
            "prompt_id": _str,
            "policy_version": _nonneg_int,
            "finish_reasons": _str_list,
            "gen_seconds": _float,
            "created_at": _float,
            "info": _flat_dict,
            "grant_id": _nonneg_int,
            "session_tag": _str,
        },
        {
            "prompt_ids": torch.int32,
            "completion_ids": torch.int32,
            "completion_lengths": torch.int32,
            "logprobs": torch.float32,
            "rewards": torch.float32,
            "loss_mask": torch.int32,
            "version_runs": torch.int64,
        },
        check=_check_rollout_group,
        optional=("loss_mask", "version_runs"),
    ),
]
_BY_TAG = {spec.tag: spec for spec in _SPECS}
_BY_CLS = {spec.cls: spec for spec in _SPECS}
for _spec in _SPECS:  # every dataclass field is declared exactly once
    assert {f.name for f in fields(_spec.cls)} == set(_spec.scalars) | set(_spec.tensors) | set(_spec.blobs)


def message_types() -> dict[str, type]:
    """Returns the registry: type tag -> message class."""
    return {spec.tag: spec.cls for spec in _SPECS}


# ---------------------------------------------------------------- encode / decode


def _tensor_to_frame(name: str, tensor: Any, expected: torch.dtype) -> tuple[dict, bytes]:
    if not isinstance(tensor, torch.Tensor):
        raise ProtocolError(f"field {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != expected:
        raise ProtocolError(f"field {name!r} must have dtype {expected}, got {tensor.dtype}")
    wire = _TORCH_TO_WIRE[expected]
    array = np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=WIRE_DTYPES[wire][0])
    return {"dtype": wire, "shape": list(tensor.shape)}, array.tobytes()


def _frame_to_tensor(name: str, desc: Any, frame: bytes, expected: torch.dtype) -> torch.Tensor:
    if not isinstance(desc, dict) or set(desc) != {"dtype", "shape"}:
        raise ProtocolError(f"tensor {name!r}: header must be a map with 'dtype' and 'shape'")
    wire, shape = desc["dtype"], desc["shape"]
    if wire not in WIRE_DTYPES:
        raise ProtocolError(f"tensor {name!r}: dtype {wire!r} is not allowed (allowed: {sorted(WIRE_DTYPES)})")
    np_dtype, torch_dtype = WIRE_DTYPES[wire]
    if torch_dtype != expected:
        raise ProtocolError(f"tensor {name!r}: dtype {wire!r} is wrong, expected {_TORCH_TO_WIRE[expected]!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(f"tensor {name!r}: shape must be a list of ints >= 0, got {shape!r}")
    expected_bytes = math.prod(shape) * np_dtype.itemsize
    if len(frame) != expected_bytes:
        raise ProtocolError(
            f"tensor {name!r}: frame has {len(frame)} bytes, shape {shape} and dtype {wire} need {expected_bytes}"
        )
    array = np.frombuffer(frame, dtype=np_dtype).astype(np_dtype.newbyteorder("="))  # native, writable copy
    return torch.from_numpy(array).reshape(shape)


def encode(msg: Message) -> list[bytes]:
    """Turns a message into ZeroMQ frames, checking it on the way.

    Args:
        msg: any message dataclass of this module.

    Returns:
        [msgpack header, *tensor frames, *bytes frames].

    Raises:
        ProtocolError: if the message breaks a rule (wrong field type, bad shape...).
    """
    spec = _BY_CLS.get(type(msg))
    if spec is None:
        raise ProtocolError(f"cannot encode a {type(msg).__name__}: not a message type of this protocol")
    scalars = {name: check(name, getattr(msg, name)) for name, check in spec.scalars.items()}
    descs, tensor_frames = {}, []
    for name, dtype in spec.tensors.items():
        if name in spec.optional and getattr(msg, name) is None:
            continue  # an optional tensor that is absent: no frame, no entry
        descs[name], frame = _tensor_to_frame(name, getattr(msg, name), dtype)
        tensor_frames.append(frame)
    blob_frames = [_bytes(name, getattr(msg, name)) for name in spec.blobs]
    if spec.check is not None:
        spec.check(msg)
    header = {"protocol": PROTOCOL_VERSION, "type": spec.tag, "fields": scalars, "tensors": descs}
    packed = msgpack.packb(header, use_bin_type=True)
    if len(packed) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header is {len(packed)} bytes, more than MAX_HEADER_BYTES = {MAX_HEADER_BYTES}")
    return [packed, *tensor_frames, *blob_frames]


def _read_header(frame: bytes) -> dict:
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header is {len(frame)} bytes, more than MAX_HEADER_BYTES = {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ProtocolError(f"header is not valid msgpack ({type(exc).__name__}: {exc})") from exc
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}")
    if "protocol" not in header:
        raise ProtocolError("header has no 'protocol' version")
    if header["protocol"] != PROTOCOL_VERSION:
        raise ProtocolError(f"wrong protocol version: got {header['protocol']!r}, expected {PROTOCOL_VERSION}")
    if "type" not in header:
        raise ProtocolError("header has no 'type' tag")
    if header["type"] not in _BY_TAG:
        raise ProtocolError(f"unknown message type {header['type']!r} (known: {sorted(_BY_TAG)})")
    for key in ("fields", "tensors"):
        if not isinstance(header.get(key), dict):
            raise ProtocolError(f"header entry {key!r} must be a map")
    return header


def peek_fields(frames: list[bytes]) -> dict | None:
    """The scalar fields in the header of a message that did not decode (e.g.
    a broken tensor frame), or None when the header itself is unreadable.
    Nothing in them is checked: use them only to identify the sender's work."""
    try:
        fields = _read_header(bytes(frames[0]))["fields"] if frames else None
    except ProtocolError:
        return None
    return dict(fields) if isinstance(fields, dict) else None


def decode(frames: list[bytes]) -> Message:
    """Turns ZeroMQ frames back into a message, checking everything.

    Args:
        frames: the frames of one multipart message (bytes-like).

    Returns:
        The message dataclass.

    Raises:
        ProtocolError: naming the problem (version, type, frame count, field, shape...).
    """
    if not frames:
        raise ProtocolError("empty message: no header frame")
    frames = [bytes(frame) for frame in frames]
    header = _read_header(frames[0])
    spec = _BY_TAG[header["type"]]
    values, tensor_descs = header["fields"], header["tensors"]
    present = [name for name in spec.tensors
               if name in tensor_descs or name not in spec.optional]
    n_expected = 1 + len(present) + len(spec.blobs)
    if len(frames) != n_expected:
        raise ProtocolError(f"{spec.tag}: wrong number of frames: got {len(frames)}, expected {n_expected}")
    if set(values) != set(spec.scalars):
        missing, extra = set(spec.scalars) - set(values), set(values) - set(spec.scalars)
        raise ProtocolError(f"{spec.tag}: fields missing {sorted(missing)}, unexpected {sorted(extra)}")
    if set(tensor_descs) != set(present):
        raise ProtocolError(f"{spec.tag}: tensors must be {sorted(spec.tensors)} (optional: "
                            f"{sorted(spec.optional)}), got {sorted(tensor_descs)}")
    kwargs = {name: check(name, values[name]) for name, check in spec.scalars.items()}
    for i, name in enumerate(present):
        kwargs[name] = _frame_to_tensor(name, tensor_descs[name], frames[1 + i], spec.tensors[name])
    for i, name in enumerate(spec.blobs):
        kwargs[name] = frames[1 + len(present) + i]
    msg = spec.cls(**kwargs)
    if spec.check is not None:
        spec.check(msg)
    return msg
