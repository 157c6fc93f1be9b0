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
"""

from __future__ import annotations

import importlib
import json
import os
import select
import subprocess
import sys
import threading
from typing import Any

STARTUP_TIMEOUT_S = 120.0
"""How long a fresh worker may take to import its module."""


def _serve(path: str) -> None:
    """Child main loop: JSON argument lists in on stdin, [ok, value] lines out."""
    module_name, name = path.split(":")
    fn = getattr(importlib.import_module(module_name), name)
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints of the function must not break the protocol
    out.write(json.dumps([True, "ready"]) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            reply = [True, fn(*json.loads(line))]
        except Exception as exc:  # reported to the caller; the worker lives on
            reply = [False, f"{type(exc).__name__}: {exc}"]
        out.write(json.dumps(reply) + "\n")
        out.flush()


class TimedWorker:
    """One child process that runs `module:function` calls with a timeout.

    Args:
        path: "module:function", importable in a fresh interpreter.
    """

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self.restarts = 0

    def _start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "rapid_async.tasks.workers", self.path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env=env)
        try:
            self._read(STARTUP_TIMEOUT_S)
        except TimeoutError:
            self._kill()
            raise RuntimeError(f"{self.path}: the worker did not start in {STARTUP_TIMEOUT_S} s")

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
    _serve(sys.argv[1])
