"""Snapshots and deltas of named-tensor dicts: the codec without the threads.

Small helpers over `codec`, `digest` and `receiver` for tools and tests that
hold weights as {name: tensor} dicts (CPU, one inference dtype, in dict
order) rather than as a model: `make_snapshot`, `make_delta` and
`apply_update`. The learner and the actor use `WeightPublisher` and
`WeightReceiver` instead.
"""

from __future__ import annotations

import hashlib

import torch

from rapid_async.weights import codec, digest
from rapid_async.weights.layout import INFERENCE_DTYPES, Layout
from rapid_async.weights.receiver import WeightReceiver
from rapid_async.wire.protocol import WeightUpdate


def _flat(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Layout]:
    """A flat CPU copy of a state and its layout (all tensors of one inference dtype)."""
    dtypes = {t.dtype for t in state.values()}
    names = [name for name, dtype in INFERENCE_DTYPES.items() if {dtype} == dtypes]
    if not names:
        raise ValueError(f"state must hold tensors of one inference dtype, got {sorted(map(str, dtypes))}")
    layout = Layout.from_named(state.items(), names[0])
    flat = layout.allocate()
    for name, view in layout.views(flat).items():
        view.copy_(state[name])
    return flat, layout


def make_snapshot(state: dict[str, torch.Tensor], version: int) -> WeightUpdate:
    """A snapshot of `state` at `version`."""
    flat, layout = _flat(state)
    data = flat.view(torch.uint8).numpy().tobytes()
    digests = digest.as_list(digest.state_digests(flat, layout))
    sha = hashlib.sha256(data).hexdigest()
    checksum = digest.certificate("snapshot", version, None, layout.dtype, layout.hash(), digests, sha)
    return WeightUpdate(version, None, "snapshot", checksum, layout.dtype,
                        codec.pack_snapshot(data, layout, digests, sha), len(data))


def make_delta(prev: dict[str, torch.Tensor], new: dict[str, torch.Tensor], version: int,
               base_version: int) -> WeightUpdate:
    """A delta turning `prev` (base_version) into `new` (version).

    Raises:
        ValueError: if the two states do not have the same names, shapes and dtype.
    """
    old_flat, old_layout = _flat(prev)
    new_flat, layout = _flat(new)
    if old_layout != layout:
        raise ValueError("make_delta: prev and new differ in names, shapes or dtype; send a snapshot")
    delta = codec.extract_delta(old_flat.view(layout.int_dtype), new_flat.view(layout.int_dtype))
    payload, raw = codec.pack_delta(delta, layout)
    digests = digest.as_list(digest.state_digests(new_flat, layout))
    checksum = digest.certificate("delta", version, base_version, layout.dtype, layout.hash(), digests, None)
    return WeightUpdate(version, base_version, "delta", checksum, layout.dtype, payload, raw)


class _Memory:
    """An engine stand-in whose weights are a CPU buffer. With `expected`
    None it takes any layout (a snapshot defines the state)."""

    def __init__(self, expected: dict | None = None, dtype: torch.dtype | None = None):
        self.expected, self.dtype = expected, dtype

    def expected_tensors(self):
        return self.expected, set(), self.dtype

    def weight_buffer(self, layout: Layout) -> torch.Tensor:
        return layout.allocate()

    def weights_updated(self) -> None:
        pass


def apply_update(state: dict[str, torch.Tensor] | None, version: int | None,
                 update: WeightUpdate) -> dict[str, torch.Tensor]:
    """The state after `update`, verified (a new dict; `state` is not modified).

    Raises:
        NeedSnapshot: as `WeightReceiver.apply`.
    """
    if state is None:
        receiver = WeightReceiver(_Memory())
    else:
        flat, layout = _flat(state)
        receiver = WeightReceiver(_Memory({n: tuple(t.shape) for n, t in state.items()}, flat.dtype))
        receiver.flat, receiver.layout, receiver.version = flat, layout, version
        receiver.digests = digest.state_digests(flat, layout)
    receiver.apply(update)
    return {name: view.clone() for name, view in receiver.layout.views(receiver.flat).items()}
