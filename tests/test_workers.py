"""TimedWorker: a runaway call is killed at its timeout, and the worker comes back."""

from __future__ import annotations

import threading
import time

import pytest

from rapid_async.tasks.workers import TimedWorker


def test_results_errors_timeouts_and_restart():
    worker = TimedWorker("time:sleep")
    try:
        assert worker.call(0.01, timeout=5) is None
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="more than 0.5 s"):
            worker.call(30, timeout=0.5)
        assert time.monotonic() - t0 < 5 and worker.restarts == 1
        with pytest.raises(RuntimeError, match="TypeError"):
            worker.call("not a number", timeout=5)
        assert worker.call(0, timeout=5) is None  # alive again
    finally:
        worker.close()


def test_threads_share_one_worker():
    worker = TimedWorker("math:factorial")
    results = {}

    def run(n):
        results[n] = worker.call(n, timeout=10)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    worker.close()
    assert results == {n: [1, 1, 2, 6, 24, 120, 720, 5040][n] for n in range(8)}


def test_memory_limit_and_warmup():
    """The child's address space is capped: a call allocating past it fails in the
    child (MemoryError, reported as RuntimeError) and the worker keeps serving."""
    import pytest

    with pytest.raises(ValueError, match="memory_mb"):
        TimedWorker("math:factorial", memory_mb=10)
    worker = TimedWorker("operator:mul", memory_mb=256, warmup=("a", 1))
    try:
        with pytest.raises(RuntimeError, match="MemoryError"):
            worker.call("x", 512 << 20, timeout=60)
        limits = open(f"/proc/{worker.pid}/limits").read()
        assert str(256 << 20) in next(x for x in limits.splitlines() if "address space" in x)
        assert worker.call("x", 3, timeout=60) == "xxx" and worker.restarts == 0
    finally:
        worker.close()
