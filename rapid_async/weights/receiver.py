"""The actor's weight intake: check, verify, then write into the engine's buffer.

Used by the actor process (`rapid_async.actor.loop`). The receiver holds the
flat buffer its engine reads its weights from (`engine.weight_buffer`: for the
hf engine the model's own parameters, on its device; for the vLLM engine a
shared-memory buffer its worker loads from), the per-tensor digests of what is
in it, and its version. For each update, in this order:

1. header: the payload's declared sizes are checked against the model's layout
   (names, shapes, dtype, change counts) before anything is decompressed, and
   zstd output is capped at the declared size (codec.py);
2. decode onto the engine's device; positions must lie inside the buffer;
3. verify: new values must be finite, and the certificate recomputed from the
   update's header (version, base version, kind, dtype, layout) and the
   digests of the would-be weights must equal the update's checksum: for a
   delta the digests follow in O(changes) from the held ones, in the same
   pass as the finiteness of the changed values (digest.check_changes; one
   fused loop on the CPU, a few percent of the apply), for a snapshot the
   sha256 of its bytes is checked as well;
4. only then write: scatter the changed elements (a delta) or copy the buffer
   (a snapshot). A snapshot's digests are recomputed from the buffer as
   written and must match the learner's.

Any failure raises `NeedSnapshot` (the buffer is left as it was, except after
a snapshot whose written digests mismatch, which also clears the version so
that nothing generates until a good snapshot arrives). `commit` tells the
engine once, after a batch of updates, that its buffer changed.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from typing import Any

import numpy as np
import torch

from rapid_async.weights import codec, digest
from rapid_async.weights.layout import Layout
from rapid_async.wire.protocol import WeightUpdate


class NeedSnapshot(Exception):
    """The update cannot be applied safely; the actor must request a full snapshot.

    Attributes:
        reason: what went wrong (version gap, bad payload, checksum mismatch...).
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class WeightReceiver:
    """The weights an actor holds, updated only with verified changes.

    Args:
        engine: an engine with `expected_tensors()`, `weight_buffer(layout)` and
            `weights_updated()` (see engines/base.py).
    """

    def __init__(self, engine: Any):
        self.engine = engine
        self.layout: Layout | None = None
        self.flat: torch.Tensor | None = None
        self.digests: torch.Tensor | None = None
        self.version: int | None = None
        self.checksum: str | None = None
        self.dirty = False
        self.timings = {"decode_s": 0.0, "verify_s": 0.0, "write_s": 0.0, "load_s": 0.0}

    @property
    def state_digest(self) -> str | None:
        """`digest.state_digest` of the held weights (None before the first snapshot)."""
        if self.layout is None or self.digests is None or self.version is None:
            return None
        return digest.state_digest(self.layout, digest.as_list(self.digests))

    def buffer_digest(self) -> str | None:
        """`state_digest` recomputed from the buffer's contents (a full pass)."""
        if self.layout is None or self.flat is None:
            return None
        return digest.state_digest(self.layout, digest.as_list(digest.state_digests(self.flat, self.layout)))

    def apply(self, update: WeightUpdate) -> None:
        """Verify one update and write it into the buffer (the engine is told in `commit`).

        Raises:
            NeedSnapshot: on a version gap, a malformed or oversized payload,
                non-finite values or a checksum mismatch.
        """
        try:
            if update.kind == "snapshot":
                self._snapshot(update)
            else:
                self._delta(update)
        except codec.PayloadError as exc:
            raise NeedSnapshot(f"{update.kind} for version {update.version}: {exc}") from exc
        self.dirty = True

    def commit(self) -> None:
        """Let the engine take the written weights (once per batch of updates)."""
        if self.dirty:
            start = time.perf_counter()
            self.engine.weights_updated()
            self.timings["load_s"] += time.perf_counter() - start
            self.dirty = False

    # ------------------------------------------------------------------ deltas

    def _delta(self, update: WeightUpdate) -> None:
        where = f"delta {update.base_version}->{update.version}"
        if self.layout is None or self.version is None or update.base_version != self.version:
            raise NeedSnapshot(f"{where} does not apply to the current version {self.version}")
        layout = self.layout
        if update.dtype != layout.dtype:
            raise NeedSnapshot(f"{where} is {update.dtype}, the weights are {layout.dtype}")
        start = time.perf_counter()
        header = codec.read_header(update.payload, "delta")
        if header.fields.get("layout_hash") != layout.hash():
            raise NeedSnapshot(f"{where} is for another set of tensors (layout hash differs)")
        delta = codec.unpack_delta(header, layout, self.flat.device)
        bits = self.flat.view(layout.int_dtype)
        try:  # decode_streams bounds the positions; this is the last line of defence
            old = bits[delta.idx]
        except (IndexError, RuntimeError) as exc:
            raise NeedSnapshot(f"{where}: positions outside the weights ({exc})") from exc
        new = codec.wrap_add(old, delta.diff)
        decoded = time.perf_counter()
        try:  # digests of the would-be weights and finiteness: one pass over the changes
            digests, nonfinite = digest.check_changes(self.digests, layout, delta.idx, old, new)
        except ValueError as exc:
            raise NeedSnapshot(f"{where}: {exc}") from exc
        if nonfinite:
            raise NeedSnapshot(f"{where} would write {nonfinite} non-finite values")
        expected = digest.certificate("delta", update.version, update.base_version, layout.dtype,
                                      layout.hash(), digest.as_list(digests), None)
        if expected != update.checksum:
            raise NeedSnapshot(f"checksum mismatch for version {update.version}: the result of "
                               f"{where} is not the learner's weights")
        verified = time.perf_counter()
        bits[delta.idx] = new
        self.digests, self.version, self.checksum = digests, update.version, update.checksum
        done = time.perf_counter()
        self.timings["decode_s"] += decoded - start
        self.timings["verify_s"] += verified - decoded
        self.timings["write_s"] += done - verified

    # ------------------------------------------------------------------ snapshots

    def _snapshot(self, update: WeightUpdate) -> None:
        where = f"snapshot of version {update.version}"
        start = time.perf_counter()
        header = codec.read_header(update.payload, "snapshot")
        layout = self._snapshot_layout(header, update, where)
        declared = header.streams["data"][1]
        if declared != layout.nbytes:  # checked before anything is decompressed
            raise NeedSnapshot(f"{where} declares {declared} bytes, its layout needs {layout.nbytes}")
        data = codec.stream_bytes(header, "data")
        digests = header.fields.get("digests")
        if not (isinstance(digests, list) and len(digests) == len(layout)
                and all(type(d) is int and 0 <= d < 1 << 64 for d in digests)):
            raise NeedSnapshot(f"{where} has no valid per-tensor digests")
        with warnings.catch_warnings():  # read-only buffer: we only read from it
            warnings.simplefilter("ignore", UserWarning)
            host = torch.from_numpy(np.frombuffer(data, dtype=np.uint8)).view(layout.torch_dtype)
        digest.warm(layout)
        decoded = time.perf_counter()
        sha = hashlib.sha256(data).hexdigest()
        expected = digest.certificate("snapshot", update.version, None, layout.dtype, layout.hash(),
                                      digests, sha)
        if expected != update.checksum:
            raise NeedSnapshot(f"checksum mismatch for version {update.version}: {where} is "
                               "corrupt or its header was altered")
        nonfinite = digest.nonfinite(host.view(layout.int_dtype), layout)
        if nonfinite:
            raise NeedSnapshot(f"{where} holds {nonfinite} non-finite values")
        verified = time.perf_counter()
        if self.flat is None or layout != self.layout:
            self.flat, self.layout = None, None
            self.flat = self.engine.weight_buffer(layout)
            self.layout = layout
        self.version = None  # the buffer is being overwritten: nothing may use it
        self.flat.copy_(host)
        written = time.perf_counter()
        mine = digest.state_digests(self.flat, layout)
        if digest.as_list(mine) != digests:
            raise NeedSnapshot(f"{where}: the weights as written do not match the learner's digests")
        self.digests, self.version, self.checksum = mine, update.version, update.checksum
        done = time.perf_counter()
        self.timings["decode_s"] += decoded - start
        self.timings["write_s"] += written - verified
        self.timings["verify_s"] += (verified - decoded) + (done - written)

    def _snapshot_layout(self, header: codec.Header, update: WeightUpdate, where: str) -> Layout:
        """The snapshot's layout, checked against what the engine's model holds."""
        try:
            layout = Layout.from_wire(update.dtype, header.fields.get("layout"))
            required, optional, dtype = self.engine.expected_tensors()
            if required is not None:  # None only from the in-memory helper of states.py
                layout.check_fits(required, optional, dtype)
        except ValueError as exc:
            raise NeedSnapshot(f"{where} does not fit the model: {exc}") from exc
        if header.fields.get("layout_hash") != layout.hash():
            raise NeedSnapshot(f"{where}: its layout hash does not match its layout")
        return layout
