"""The learner's weight publisher: a thread that turns versions into updates.

Used by the learner process (`Learner.publish`). The training loop calls
`stage(version)`, which only copies the parameters, cast to the inference
dtype, into a preallocated flat buffer on the training device (on a GPU an
asynchronous copy on the training stream, ordered before the next optimizer
step) and returns. Everything else happens in this thread, on its own CUDA
stream when the weights are on a GPU:

    take the newest staged version (an older one not yet taken is superseded)
    digests of the new weights, on the device          (digest.py)
    compare with the last published buffer, extract the change, on the device
    copy only the change's streams to the host, zstd   (codec.py)
    hand the WeightUpdate to `on_update`; the new buffer becomes the base
    build the snapshot of the published version when one is asked for

Deltas always chain against the version actually published last. Three flat
buffers rotate: the published base, the one being encoded, and the one the
training loop stages into; so staging never waits for an encode. A failure of
the thread is re-raised in the training loop by `check()`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any, Callable

import torch

from rapid_async.weights import codec, digest
from rapid_async.weights.layout import Layout
from rapid_async.wire.protocol import WeightUpdate

log = logging.getLogger("rapid.weights")


class WeightPublisher(threading.Thread):
    """Encodes staged versions in the background and hands out the updates.

    Args:
        model: the learner's model; its parameters (tied ones once) are published.
        dtype: inference dtype name.
        on_update: called in this thread with (delta WeightUpdate, stats dict)
            for every published version.
        on_snapshot: called in this thread with a snapshot WeightUpdate after
            `request_snapshot`.
        gather: called on the training thread for the full parameters, in
            `named_parameters` order, when the model is sharded over several
            learner ranks (a collective: `Trainer.publish_params`); None: the
            model's own parameters.
        fill: called on the training thread with the staging buffer's views
            (in `named_parameters` order) to write the weights into them, cast,
            instead of copying `gather()`'s list (LoRA: `MergedWeights.fill`
            merges one tensor at a time). `model` then only needs
            `named_parameters()`.
    """

    def __init__(self, model: torch.nn.Module, dtype: str,
                 on_update: Callable[[WeightUpdate, dict], None],
                 on_snapshot: Callable[[WeightUpdate], None] | None = None,
                 gather: Callable[[], list[torch.Tensor]] | None = None,
                 fill: Callable[[list[torch.Tensor]], None] | None = None):
        super().__init__(name="weight-publisher", daemon=True)
        self.params = [p for _, p in model.named_parameters()]
        self.gather = gather or (lambda: [p.detach() for p in self.params])
        self.fill = fill or (lambda views: torch._foreach_copy_(views, self.gather()))
        self.layout = Layout.from_model(model, dtype)
        self.device = self.params[0].device
        self.on_update, self.on_snapshot = on_update, on_snapshot
        # Touched now, so that the first stage() does not pay for fresh pages.
        self.buffers = [self.layout.allocate(self.device).zero_() for _ in range(3)]
        self.views = [list(self.layout.views(b).values()) for b in self.buffers]
        self.published, self.staging, self.spare = 0, 1, 2
        self.published_version: int | None = None
        self.published_digests: list[int] = []
        self._pending: int | None = None
        self.staged_version: int | None = None
        self._staged_at = 0.0
        self._event: Any = None
        self._snapshot_wanted = False
        self._snapshot: WeightUpdate | None = None
        self._halt = False
        self._busy = False
        self._cond = threading.Condition()
        self.error: BaseException | None = None
        self.superseded = 0
        self.stats: dict[str, float] = {}
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # ------------------------------------------------------------ training thread

    def _copy_params(self, index: int) -> None:
        """Cast the parameters into buffer `index` (async on CUDA; an event marks the end)."""
        with torch.no_grad():
            self.fill(self.views[index])
        if self._stream is not None:
            self._event = torch.cuda.Event()
            self._event.record()

    def begin(self, version: int) -> None:
        """Publish nothing but make `version` (the current weights) the base of the next delta."""
        self._copy_params(self.published)
        self._sync_event()
        self.published_digests = digest.as_list(digest.state_digests(self.buffers[self.published], self.layout))
        self.published_version = version
        self.start()

    def stage(self, version: int) -> float:
        """Hand the current weights over as `version`; returns the seconds it took.

        Only the cast into the staging buffer happens here; a version staged
        earlier and not yet taken by the thread is replaced (superseded).
        """
        self.check()
        start = time.perf_counter()
        with self._cond:
            self._copy_params(self.staging)
            if self._pending is not None:
                self.superseded += 1
            self._pending = self.staged_version = version
            self._staged_at = start
            self._cond.notify_all()
        return time.perf_counter() - start

    def wait_published(self, version: int, timeout: float | None = None) -> bool:
        """Block until `version` (or a later one) is published; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (self.published_version or 0) < version:
                self.check()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.5 if left is None else min(left, 0.5))
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every staged version is published."""
        with self._cond:
            target = self.staged_version
        return True if target is None else self.wait_published(target, timeout)

    def request_snapshot(self) -> None:
        """Ask for a snapshot of the published version (delivered to `on_snapshot`)."""
        with self._cond:
            self._snapshot_wanted = True
            self._cond.notify_all()

    def check(self) -> None:
        """Re-raise a failure of the publisher thread in the caller."""
        if self.error is not None:
            raise RuntimeError(f"weight publisher failed: {self.error!r}") from self.error

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._halt = True
            self._cond.notify_all()
        if self.is_alive():
            self.join(timeout)

    # ------------------------------------------------------------ publisher thread

    def run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._halt or self._pending is not None or self._snapshot_wanted):
                        self._cond.wait()
                    if self._halt:
                        return
                    job = self._take()
                if job is not None:
                    self._publish(*job)
                if self._snapshot_wanted:  # between two publishes: never starved by them
                    self._serve_snapshot()
        except BaseException as exc:  # re-raised by check() in the training loop
            self.error = exc
            log.exception("weight publisher failed")
            with self._cond:
                self._cond.notify_all()

    def _take(self) -> tuple[int, float, Any] | None:
        """Under the lock: claim the staged buffer (it becomes the one being encoded)."""
        if self._pending is None:
            return None
        version, staged_at, event = self._pending, self._staged_at, self._event
        self._pending = None
        self.staging, self.spare = self.spare, self.staging  # spare now holds the staged weights
        return version, staged_at, event

    def _sync_event(self, event: Any = None) -> None:
        event = event or self._event
        if self._stream is not None and event is not None:
            self._stream.wait_event(event)

    def _publish(self, version: int, staged_at: float, event: Any) -> None:
        start = time.perf_counter()
        with torch.cuda.stream(self._stream) if self._stream is not None else _nullcontext():
            self._sync_event(event)
            new = self.buffers[self.spare]
            digests = digest.as_list(digest.state_digests(new, self.layout))
            old_bits = self.buffers[self.published].view(self.layout.int_dtype)
            delta = codec.extract_delta(old_bits, new.view(self.layout.int_dtype))
            payload, raw = codec.pack_delta(delta, self.layout)
            bound = codec.entropy_bound_bits(self.layout.numel, delta.diff) / 8
            if self._stream is not None:
                self._stream.synchronize()
        base = self.published_version
        update = WeightUpdate(version, base, "delta",
                              digest.certificate("delta", version, base, self.layout.dtype,
                                                 self.layout.hash(), digests, None),
                              self.layout.dtype, payload, raw)
        with self._cond:
            self.published, self.spare = self.spare, self.published
            self.published_version, self.published_digests = version, digests
            self._snapshot = None
            now = time.perf_counter()
            self.stats = {"weights/version": version, "weights/base_version": base,
                          "weights/update_bytes": len(payload), "weights/raw_bytes": raw,
                          "weights/changed": int(delta.idx.numel()),
                          "weights/elements": self.layout.numel,
                          "weights/entropy_bound_bytes": bound,
                          "weights/snapshot_bytes": self.layout.nbytes,
                          "weights/encode_s": now - start, "weights/latency_s": now - staged_at,
                          "weights/superseded": self.superseded}
            self._cond.notify_all()
        self.on_update(update, dict(self.stats))

    def snapshot(self) -> WeightUpdate:
        """The snapshot of the published version (built once per version).

        Call it from this thread (or before `begin` starts it): the buffer it
        reads is recycled as a staging buffer after the next publish.
        """
        with self._cond:
            cached, index = self._snapshot, self.published
            version, digests = self.published_version, self.published_digests
        if cached is not None and cached.version == version:
            return cached
        data = self.buffers[index].view(torch.uint8).cpu().numpy().tobytes()
        sha = hashlib.sha256(data).hexdigest()
        payload = codec.pack_snapshot(data, self.layout, digests, sha)
        update = WeightUpdate(version, None, "snapshot",
                              digest.certificate("snapshot", version, None, self.layout.dtype,
                                                 self.layout.hash(), digests, sha),
                              self.layout.dtype, payload, len(data))
        with self._cond:
            if self.published_version == version:
                self._snapshot = update
        return update

    def _serve_snapshot(self) -> None:
        with self._cond:
            self._snapshot_wanted = False
        update = self.snapshot()
        if self.on_snapshot is not None:
            self.on_snapshot(update)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
