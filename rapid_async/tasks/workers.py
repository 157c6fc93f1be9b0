"""A worker process that runs one function with a wall-clock bound.

Used by verifiers in the actor process (and evaluation) whose work can run away
(math-verify's symbolic comparison can take minutes on a pathological
answer). Python cannot stop a thread, and signal-based timeouts only work in
the main thread, so the work runs in a child process; when a call takes
longer than its timeout the child is killed (by its pid) and a fresh one is
started for the next call. Calls are serialised by a lock, so threads may
share one worker.

The child is `python -m rapid_async.tasks.workers module:function`: a fresh
interpreter (no copy of the parent's threads or CUDA state, and no
re-import of the parent's main script). Arguments and results travel as one
JSON line each way, so they must be JSON values (strings, numbers, lists...).

`memory_mb` caps the child's address space (RLIMIT_AS, set before it
imports its module): a call that would take more memory fails inside the
child (MemoryError, reported as RuntimeError), or the child dies and the next
call starts a fresh one; the host's memory is not at stake either way.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import select
import subprocess
import sys
import threading
from typing import Any

STARTUP_TIMEOUT_S = 120.0
"""How long a fresh worker may take to import its module."""


def _serve(path: str, memory_mb: int = 0) -> None:
    """Child main loop: JSON argument lists in on stdin, [ok, value] lines out."""
    if memory_mb > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    module_name, name = path.split(":")
    fn = getattr(importlib.import_module(module_name), name)
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints of the function must not break the protocol
    out.write(json.dumps([True, "ready"]) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            reply = [True, fn(*json.loads(line))]
        except Exception as exc:  # reported to the caller (MemoryError too); the worker lives on
            reply = [False, f"{type(exc).__name__}: {exc}"]
        out.write(json.dumps(reply) + "\n")
        out.flush()


class TimedWorker:
    """One child process that runs `module:function` calls with a timeout.

    Args:
        path: "module:function", importable in a fresh interpreter.
        memory_mb: the child's address-space limit in MiB (None: no limit).
        warmup: arguments of one call made when a child starts, counted in its
            start-up time, not in the next call's timeout (e.g. so that lazy
            imports inside the function are done by then).
    """

    def __init__(self, path: str, memory_mb: int | None = None, warmup: tuple | None = None):
        if memory_mb is not None and (isinstance(memory_mb, bool) or not isinstance(memory_mb, int)
                                      or memory_mb < 64):
            raise ValueError(f"memory_mb must be an integer >= 64 (MiB) or None, got {memory_mb!r}")
        self.path = path
        self.memory_mb = memory_mb
        self.warmup = warmup
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self.restarts = 0

    def _start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "rapid_async.tasks.workers", self.path, str(self.memory_mb or 0)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env=env)
        try:
            self._read(STARTUP_TIMEOUT_S)
            if self.warmup is not None:
                self._proc.stdin.write(json.dumps(list(self.warmup)) + "\n")
                self._proc.stdin.flush()
                self._read(STARTUP_TIMEOUT_S)
        except TimeoutError:
            self._kill()
            raise RuntimeError(f"{self.path}: the worker did not start in {STARTUP_TIMEOUT_S} s")

    @property
    def pid(self) -> int | None:
        """The child's process id (None when none is running)."""
        return None if self._proc is None else self._proc.pid

    def _read(self, timeout: float) -> Any:
        """The next reply line within `timeout` seconds."""
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError
        line = self._proc.stdout.readline()
        if not line:
            self._kill()
            raise RuntimeError(f"{self.path}: the worker process died")
        return json.loads(line)

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            for stream in (self._proc.stdin, self._proc.stdout):
                stream.close()
        self._proc = None

    def call(self, *args: Any, timeout: float) -> Any:
        """Run the function on `args` in the worker.

        Args:
            *args: the function's arguments (JSON values).
            timeout: seconds the call may take (a fresh worker's start-up is
                not counted).

        Returns:
            The function's result.

        Raises:
            TimeoutError: the call took longer (the worker was killed).
            RuntimeError: the function raised (its text) or the worker died.
        """
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            try:
                self._proc.stdin.write(json.dumps(list(args)) + "\n")
                self._proc.stdin.flush()
                ok, value = self._read(timeout)
            except TimeoutError:
                self._kill()
                self.restarts += 1
                raise TimeoutError(f"{self.path} took more than {timeout} s") from None
            except (BrokenPipeError, OSError, ValueError) as exc:
                self._kill()
                raise RuntimeError(f"{self.path}: the worker process failed ({exc})") from exc
        if not ok:
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        """Stop the worker process."""
        with self._lock:
            self._kill()


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
