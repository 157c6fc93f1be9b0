"""Weights in the inference dtype: how the learner publishes them and actors take them.

Used by both processes. Modules:

    layout.py     the weights as one flat buffer of one dtype; tied tensors once
    digest.py     per-tensor linear digests (O(changes) to update) and the
                  certificate that binds them to an update's version and header
    kernels.py    the digests and finiteness checks as fused CPU loops (numba)
    codec.py      payloads: lossless deltas (positions + differences, zstd) and
                  snapshots, with sizes declared and checked before decompression
    publisher.py  learner: a thread that encodes staged versions off the
                  training loop, on the training device, and builds snapshots
    receiver.py   actor: check, verify, then write into the engine's buffer
    states.py     the same for {name: tensor} dicts (tools and tests)

The actor's weights equal, bit for bit, the learner's parameters cast to the
inference dtype; every update carries a checksum that proves it.
"""

from rapid_async.weights.layout import INFERENCE_DTYPES, Layout, cast_state
from rapid_async.weights.receiver import NeedSnapshot, WeightReceiver
from rapid_async.weights.digest import digest_named
from rapid_async.weights.states import apply_update, make_delta, make_snapshot

__all__ = ["INFERENCE_DTYPES", "Layout", "NeedSnapshot", "WeightReceiver", "apply_update",
           "cast_state", "digest_named", "make_delta", "make_snapshot"]
