"""The `after` implementation for `rapid_async.bench.weights`: publisher and receiver.

Not on the runtime path. `AfterLearner` drives a `WeightPublisher` the way
`Learner.publish` does (stage on the training thread, encode in its thread);
`AfterActor` drives a `WeightReceiver` the way the actor does (verify, write
into the engine's buffer, one engine load per batch).
"""

from __future__ import annotations

import threading
import time

from rapid_async.weights import WeightReceiver
from rapid_async.weights.publisher import WeightPublisher

DTYPE = "bfloat16"


class AfterLearner:
    """Publishes through the publisher thread; `publish` returns the blocked time."""

    def __init__(self, model):
        self.done: list = []
        self._snapshots: list = []
        self._got_snapshot = threading.Event()
        self.publisher = WeightPublisher(model, DTYPE, on_update=self._published,
                                         on_snapshot=self._snapshot)
        self.publisher.begin(0)

    def _published(self, update, stats) -> None:
        self.done.append((update, {"encode_s": stats["weights/encode_s"],
                                   "latency_s": stats["weights/latency_s"],
                                   "raw_bytes": stats["weights/raw_bytes"],
                                   "publisher_entropy_bound_bytes": stats["weights/entropy_bound_bytes"],
                                   "superseded": stats["weights/superseded"]}))

    def _snapshot(self, update) -> None:
        self._snapshots.append(update)
        self._got_snapshot.set()

    def snapshot(self, version: int):
        start = time.perf_counter()
        self.publisher.request_snapshot()
        self._got_snapshot.wait(600)
        update = self._snapshots[-1]
        assert update.version == version
        return update, time.perf_counter() - start

    def publish(self, version: int) -> float:
        return self.publisher.stage(version)

    def finish(self):
        self.publisher.flush(timeout=600)
        self.publisher.close()
        return self.done


class AfterActor:
    """Takes updates through a WeightReceiver into the engine's own buffer."""

    def __init__(self, engine, engine_name: str):
        self.engine, self.engine_name = engine, engine_name
        self.receiver = WeightReceiver(engine)

    def install(self, update) -> dict:
        before = dict(self.receiver.timings)
        start = time.perf_counter()
        self.receiver.apply(update)
        applied = time.perf_counter()
        self.receiver.commit()
        done = time.perf_counter()
        parts = {k: self.receiver.timings[k] - before[k] for k in ("decode_s", "verify_s", "write_s")}
        return {"apply_verify_s": applied - start, "engine_load_s": done - applied,
                "total_s": done - start, **parts}

    def sha(self) -> str:
        from rapid_async.bench.weights import tensors_sha

        if self.engine_name == "hf":  # the engine's own parameters (views of the buffer)
            return tensors_sha(dict(self.engine.model.named_parameters()))
        return tensors_sha(self.receiver.layout.views(self.receiver.flat))
