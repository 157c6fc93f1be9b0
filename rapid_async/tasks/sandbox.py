"""Run untrusted Python programs (model-written code) in a sandbox.

Used by the mbpp task's verifier in the actor process (and by evaluation).
Each program runs in its own process with:

- a wall-clock timeout (the whole process tree is killed by its group id,
  and in a PID namespace everything dies with the namespace's first process),
- resource limits: CPU seconds, address space (memory), file size (also caps
  what it can print: stdout and stderr go to files), process count, open files,
  no core dumps,
- a fresh temporary directory as its working directory and HOME,
- a scrubbed environment (PATH, HOME, TMPDIR, LANG only: no secrets from ours),
- `python -I -S`: no site-packages, no user site, no PYTHON* variables.

How much more is enforced depends on the platform; `Sandbox.isolation` says
which mode is in use (chosen once, by trying them in this order, "auto"):

- "namespaces" (we are root, `unshare` works): new network namespace (no
  interface but a downed loopback: no network at all), PID namespace (cannot
  see or signal our processes), mount namespace in which every file system
  is read-only and /tmp, /var/tmp and /dev/shm are private tmpfs, IPC and
  UTS namespaces; and the program runs as a random unprivileged uid (so the
  process limit counts its processes alone).
- "userns" (not root, unprivileged user namespaces allowed): the same
  namespaces inside a user namespace; the program keeps our uid, but its
  view of the file systems is read-only outside the private tmpfs. The
  process limit is per user namespace on Linux >= 5.14 (older kernels count
  all our processes).
- "none": resource limits, scrubbed environment and temporary directory
  only. No network isolation and no file-system isolation beyond our own
  permissions; a warning is logged. Request it explicitly to silence that.

Several programs may run at once, up to `max_parallel` (a semaphore).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("rapid.sandbox")
MODES = ("namespaces", "userns", "none")
INIT = Path(__file__).with_name("sandbox_init.py")
_UNSHARE = ["--net", "--pid", "--mount", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc"]


@dataclass(frozen=True)
class Limits:
    """Resource limits of one program.

    Attributes:
        wall_s: wall-clock seconds before the program is killed.
        cpu_s: CPU seconds (RLIMIT_CPU).
        memory_mb: address space in MiB (RLIMIT_AS).
        file_mb: largest file it may write, stdout and stderr included (RLIMIT_FSIZE).
        processes: processes it may have at once (RLIMIT_NPROC).
        open_files: open file descriptors (RLIMIT_NOFILE).
        output_bytes: how much of stdout / stderr is read back.
    """

    wall_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    file_mb: int = 8
    processes: int = 16
    open_files: int = 64
    output_bytes: int = 65536

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"sandbox limit {name} must be a number > 0, got {value!r}")


@dataclass
class RunResult:
    """What a program did.

    Attributes:
        returncode: exit status (negative: killed by that signal; None: timed out).
        timed_out: killed at the wall-clock limit.
        stdout, stderr: the first `Limits.output_bytes` of each, decoded.
        seconds: wall-clock time.
    """

    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    seconds: float


def _read_head(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def _own_process_count() -> int:
    """Processes of our uid (RLIMIT_NPROC counts them all outside a user namespace)."""
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                count += entry.stat().st_uid == uid
            except OSError:
                pass
    return count


class Sandbox:
    """Runs Python programs under `limits`, at most `max_parallel` at once.

    Args:
        limits: resource limits of every program.
        max_parallel: programs running at the same time (>= 1).
        isolation: "auto" or one of MODES; a named mode that does not work
            here raises ValueError.
        python: interpreter for the programs (default: ours if the
            unprivileged uid can run it, else /usr/bin/python3).
    """

    def __init__(self, limits: Limits | None = None, max_parallel: int = 4,
                 isolation: str = "auto", python: str | None = None):
        if isinstance(max_parallel, bool) or not isinstance(max_parallel, int) or max_parallel < 1:
            raise ValueError(f"max_parallel must be an integer >= 1, got {max_parallel!r}")
        if isolation != "auto" and isolation not in MODES:
            raise ValueError(f"isolation = {isolation!r} is not one of auto, {', '.join(MODES)}")
        self.limits = limits or Limits()
        self.max_parallel = max_parallel
        self._slots = threading.BoundedSemaphore(max_parallel)
        self._choose(isolation, python)

    # ------------------------------------------------------------------ set-up

    def _candidates(self, python: str | None) -> list[str]:
        if python:
            return [python]
        found = [sys.executable, shutil.which("python3") or "", "/usr/bin/python3"]
        return [p for p in dict.fromkeys(found) if p and os.path.exists(p)]

    def _choose(self, isolation: str, python: str | None) -> None:
        """Pick the strongest mode (and an interpreter) that runs a test program."""
        modes = MODES if isolation == "auto" else (isolation,)
        tried = []
        for mode in modes:
            if isolation == "auto" and (mode == "namespaces") != (os.geteuid() == 0) \
                    and mode != "none":
                continue
            for candidate in self._candidates(python):
                self.isolation, self.python = mode, candidate
                result = self._execute("import math\nprint(math.factorial(5))\n", {}, {})
                if result.returncode == 0 and result.stdout.strip() == "120":
                    if mode == "none" and isolation == "auto":
                        log.warning("sandbox: no namespaces here (%s); programs run with resource "
                                    "limits only: NO network or file-system isolation",
                                    "; ".join(tried) or "not tried")
                    log.info("sandbox: isolation %s, python %s", mode, candidate)
                    return
                tried.append(f"{mode} with {candidate}: rc {result.returncode} "
                             f"{result.stderr.strip()[-200:]}")
        raise ValueError("sandbox: no isolation mode works here: " + " | ".join(tried))

    # ------------------------------------------------------------------ running

    def _command(self) -> list[str]:
        init = [self.python, "-I", "-S", str(INIT)]
        if self.isolation == "namespaces":
            return ["unshare", *_UNSHARE, "--", *init]
        if self.isolation == "userns":
            return ["unshare", "--user", "--map-root-user", *_UNSHARE, "--", *init]
        return init

    def _config(self, code: str, env: dict, files: dict, workdir: str) -> dict:
        lim = self.limits
        processes = lim.processes
        if self.isolation == "none" and os.geteuid() != 0:
            processes += _own_process_count()
        root = os.geteuid() == 0 and self.isolation != "userns"
        return {"code": code, "files": files, "mount": self.isolation != "none",
                "uid": random.randrange(200_000, 2**31 - 2) if root else None,
                "workdir": workdir if self.isolation == "none" else None,
                "python": self.python, "env": env,
                "limits": {"cpu_s": int(lim.cpu_s), "memory_bytes": int(lim.memory_mb) << 20,
                           "file_bytes": int(lim.file_mb) << 20, "processes": int(processes),
                           "open_files": int(lim.open_files)}}

    def _execute(self, code: str, env: dict, files: dict) -> RunResult:
        host = Path(tempfile.mkdtemp(prefix="rapid-sandbox-"))
        work = host / "work"
        work.mkdir()
        os.chmod(host, 0o711)
        try:
            cfg = self._config(code, env, files, str(work))
            if cfg["uid"] is not None and self.isolation == "none":
                os.chown(work, cfg["uid"], cfg["uid"])
            with open(host / "stdout", "wb") as out, open(host / "stderr", "wb") as err:
                t0 = time.monotonic()
                proc = subprocess.Popen(self._command(), stdin=subprocess.PIPE, stdout=out,
                                        stderr=err, start_new_session=True, cwd=host,
                                        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
                timed_out = False
                try:
                    proc.communicate(json.dumps(cfg).encode(), timeout=self.limits.wall_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    self._kill(proc)
                seconds = time.monotonic() - t0
            n = self.limits.output_bytes
            return RunResult(None if timed_out else proc.returncode, timed_out,
                             _read_head(host / "stdout", n), _read_head(host / "stderr", n), seconds)
        finally:
            shutil.rmtree(host, ignore_errors=True)

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        """Kill the program's whole process group (its session, which we started)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def run(self, code: str, env: dict | None = None, files: dict | None = None) -> RunResult:
        """Run one program (waits for a free slot).

        Args:
            code: the Python program (main.py in its working directory).
            env: extra environment variables for it.
            files: more files for its working directory, name -> text (e.g.
                a nonce the program reads and deletes before running
                untrusted code: unlike the environment, a deleted file
                cannot be read back from /proc).

        Returns:
            Its result; a program that fails or misbehaves is a result, never
            an exception here (set-up failures on our side do raise OSError).
        """
        with self._slots:
            return self._execute(code, dict(env or {}), dict(files or {}))

    def run_many(self, codes: list[str], files: list[dict] | None = None) -> list[RunResult]:
        """Run programs in parallel, up to `max_parallel` at once, results in order."""
        files = files or [{} for _ in codes]
        with ThreadPoolExecutor(max_workers=self.max_parallel) as pool:
            return list(pool.map(lambda c, f: self.run(c, files=f), codes, files))
