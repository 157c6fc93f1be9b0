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
which mode is in use (chosen once, by trying them in this order, "auto") and
`Sandbox.limits_enforced` lists what holds:

- "namespaces" (we are root, `unshare` works): new network namespace (no
  interface but a downed loopback: no network at all, no abstract unix
  sockets of the host), PID namespace (cannot see or signal our processes),
  IPC namespace with SysV shared memory capped at `shm_mb`, UTS namespace,
  and a mount namespace whose root is minimal (sandbox_root.py): only the
  interpreter, its stdlib and shared libraries, read-only, plus size-capped
  private /tmp and /dev/shm; no project file, dataset, /root, /home, /run or
  host socket is visible. The program runs as a random unprivileged uid with
  every capability set empty and no_new_privs.
- "userns" (not root, unprivileged user namespaces allowed): the same
  namespaces and minimal root inside a user namespace; the program is uid 0
  of that namespace with every capability dropped (bounding set included)
  and no_new_privs, so it cannot mount, unmount or remount anything. The
  process limit is per user namespace on Linux >= 5.14 (older kernels count
  all our processes).
- "none": resource limits, scrubbed environment and temporary directory
  only. No network isolation and no file-system isolation beyond our own
  permissions; a warning is logged. Request it explicitly to silence that.

In every mode, where a cgroup file system lets us (root, or a delegated v2
group; sandbox_cgroup.py), the whole program - all its processes together -
is capped at `total_memory_mb` (shared memory and tmpfs pages included, no
swap), `cpus` cores and `processes` tasks; elsewhere only the per-process
limits hold and a warning is logged.

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

from rapid_async.tasks.sandbox_cgroup import Group, find_backend
from rapid_async.tasks.sandbox_root import root_plan

log = logging.getLogger("rapid.sandbox")
MODES = ("namespaces", "userns", "none")
CGROUPS = ("auto", "required", "off")
INIT = Path(__file__).with_name("sandbox_init.py")
SETUP_FAILED = "rapid-sandbox setup failed:"
_UNSHARE = ["--net", "--pid", "--mount", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc"]


class SandboxSetupError(OSError):
    """The box could not be set up (nothing of the program ran)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one program.

    Attributes:
        wall_s: wall-clock seconds before the program is killed.
        cpu_s: CPU seconds per process (RLIMIT_CPU).
        memory_mb: address space per process in MiB (RLIMIT_AS).
        file_mb: largest file it may write, stdout and stderr included (RLIMIT_FSIZE).
        processes: processes it may have at once (RLIMIT_NPROC; cgroup pids.max).
        open_files: open file descriptors (RLIMIT_NOFILE).
        output_bytes: how much of stdout / stderr is read back.
        total_memory_mb: memory of the whole program, all its processes, shared
            memory and tmpfs pages together (cgroup memory limit; no swap).
        cpus: CPU cores the whole program may use (cgroup CPU quota).
        shm_mb: SysV shared memory of the whole program (its IPC namespace).
        tmpfs_mb: size of each private tmpfs (/tmp, /dev/shm).
    """

    wall_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    file_mb: int = 8
    processes: int = 16
    open_files: int = 64
    output_bytes: int = 65536
    total_memory_mb: int = 1024
    cpus: float = 1.0
    shm_mb: int = 64
    tmpfs_mb: int = 64

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
        memory_peak_bytes: the whole program's peak memory as its cgroup counted
            it (None without a cgroup).
        cpu_s: CPU seconds all its processes used, from its cgroup (None without).
    """

    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    seconds: float
    memory_peak_bytes: int | None = None
    cpu_s: float | None = None


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
        cgroups: "auto" (whole-program limits where a cgroup file system
            allows, else a logged warning), "required" (ValueError where
            none works) or "off".
        extra_paths: more host paths the programs see, read-only (e.g. a
            toolchain for `run_command`).
    """

    def __init__(self, limits: Limits | None = None, max_parallel: int = 4,
                 isolation: str = "auto", python: str | None = None, cgroups: str = "auto",
                 extra_paths: tuple[str, ...] = ()):
        if isinstance(max_parallel, bool) or not isinstance(max_parallel, int) or max_parallel < 1:
            raise ValueError(f"max_parallel must be an integer >= 1, got {max_parallel!r}")
        if isolation != "auto" and isolation not in MODES:
            raise ValueError(f"isolation = {isolation!r} is not one of auto, {', '.join(MODES)}")
        if cgroups not in CGROUPS:
            raise ValueError(f"cgroups = {cgroups!r} is not one of {', '.join(CGROUPS)}")
        self.limits = limits or Limits()
        self.max_parallel = max_parallel
        self.extra_paths = tuple(os.path.abspath(p) for p in extra_paths)
        self._slots = threading.BoundedSemaphore(max_parallel)
        self._cgroup, why = (None, "cgroups = 'off'") if cgroups == "off" else find_backend()
        if self._cgroup is None and cgroups == "required":
            raise ValueError(f"sandbox: cgroups = 'required' but no cgroup works here: {why}")
        self._cgroup_why = why
        self._choose(isolation, python)
        self.limits_enforced = self._report()
        log.info("sandbox: %s", "; ".join(self.limits_enforced))
        if self._cgroup is None and cgroups == "auto":
            log.warning("sandbox: no whole-program cgroup limits (%s): memory, CPU and process "
                        "limits hold per process only", why)

    # ------------------------------------------------------------------ set-up

    def _candidates(self, python: str | None) -> list[str]:
        if python:
            return [os.path.realpath(python)]
        found = [sys.executable, shutil.which("python3") or "", "/usr/bin/python3"]
        return [os.path.realpath(p) for p in dict.fromkeys(found) if p and os.path.exists(p)]

    def _choose(self, isolation: str, python: str | None) -> None:
        """Pick the strongest mode (and an interpreter) that runs a test program."""
        modes = MODES if isolation == "auto" else (isolation,)
        tried = []
        for mode in modes:
            if isolation == "auto" and (mode == "namespaces") != (os.geteuid() == 0) \
                    and mode != "none":
                continue
            for candidate in dict.fromkeys(self._candidates(python)):
                self.isolation, self.python = mode, candidate
                try:
                    result = self._execute(None, "import math\nprint(math.factorial(5))\n", {}, {})
                except OSError as e:
                    tried.append(f"{mode} with {candidate}: {e}")
                    continue
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

    def _report(self) -> list[str]:
        """What holds in this sandbox, one line per guarantee."""
        lim = self.limits
        lines = [f"isolation {self.isolation}"]
        if self.isolation != "none":
            lines += ["no network (network namespace)", "own PID, IPC and UTS namespaces",
                      f"SysV shm capped at {lim.shm_mb} MiB (IPC namespace)",
                      "minimal read-only root: interpreter, stdlib, shared libraries only",
                      f"private /tmp and /dev/shm of {lim.tmpfs_mb} MiB each",
                      "all capabilities dropped, no_new_privs"
                      + (", random unprivileged uid" if self.isolation == "namespaces" else "")]
        else:
            lines += ["no network or file-system isolation", "no_new_privs"]
        if self._cgroup is not None:
            lines.append(self._cgroup.describe(lim.total_memory_mb, lim.cpus, lim.processes))
        else:
            lines.append(f"no whole-program cgroup ({self._cgroup_why})")
        lines.append(f"per process: {lim.cpu_s} CPU s, {lim.memory_mb} MiB address space, "
                     f"{lim.file_mb} MiB files, {lim.processes} processes, "
                     f"{lim.open_files} open files")
        return lines

    # ------------------------------------------------------------------ running

    def _command(self) -> list[str]:
        init = [self.python, "-I", "-S", str(INIT)]
        if self.isolation == "namespaces":
            return ["unshare", *_UNSHARE, "--", *init]
        if self.isolation == "userns":
            return ["unshare", "--user", "--map-root-user", *_UNSHARE, "--", *init]
        return init

    def _config(self, argv, code: str, env: dict, files: dict, workdir: str) -> dict:
        lim = self.limits
        processes = lim.processes
        if self.isolation == "none" and os.geteuid() != 0:
            processes += _own_process_count()
        root = os.geteuid() == 0 and self.isolation != "userns"
        plan = None
        if self.isolation != "none":
            plan = root_plan(self.python, self.extra_paths)
        return {"code": code, "files": files, "argv": argv, "root": plan,
                "userns": self.isolation == "userns",
                "uid": random.randrange(200_000, 2**31 - 2) if root else None,
                "workdir": workdir if self.isolation == "none" else None,
                "python": self.python, "env": env,
                "limits": {"cpu_s": int(lim.cpu_s), "memory_bytes": int(lim.memory_mb) << 20,
                           "file_bytes": int(lim.file_mb) << 20, "processes": int(processes),
                           "open_files": int(lim.open_files), "shm_bytes": int(lim.shm_mb) << 20,
                           "tmpfs_bytes": int(lim.tmpfs_mb) << 20}}

    def _group(self) -> Group | None:
        if self._cgroup is None:
            return None
        lim = self.limits
        return self._cgroup.create(int(lim.total_memory_mb) << 20, float(lim.cpus),
                                   int(lim.processes))

    def _execute(self, argv, code: str, env: dict, files: dict, cwd: str | None = None) -> RunResult:
        host = Path(tempfile.mkdtemp(prefix="rapid-sandbox-"))
        work = host / "work"
        work.mkdir()
        (host / "root").mkdir()
        os.chmod(host, 0o711)
        group = self._group()
        ready_r, ready_w = os.pipe()
        try:
            cfg = self._config(argv, code, env, files, str(work))
            cfg["cgroup_procs"] = group.procs if group else []
            cfg["ready_fd"], cfg["cwd"] = ready_w, cwd
            if cfg["uid"] is not None and self.isolation == "none":
                os.chown(work, cfg["uid"], cfg["uid"])
            with open(host / "stdout", "wb") as out, open(host / "stderr", "wb") as err:
                t0 = time.monotonic()
                proc = subprocess.Popen(self._command(), stdin=subprocess.PIPE, stdout=out,
                                        stderr=err, start_new_session=True, cwd=host,
                                        pass_fds=(ready_w,),
                                        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
                os.close(ready_w)
                ready_w = -1
                timed_out = False
                try:
                    proc.communicate(json.dumps(cfg).encode(), timeout=self.limits.wall_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    self._kill(proc, group)
                seconds = time.monotonic() - t0
            peak, cpu = group.usage() if group else (None, None)
            n = self.limits.output_bytes
            result = RunResult(None if timed_out else proc.returncode, timed_out,
                               _read_head(host / "stdout", n), _read_head(host / "stderr", n),
                               seconds, peak, cpu)
            os.set_blocking(ready_r, False)
            try:
                ready = os.read(ready_r, 2) == b"ok"
            except BlockingIOError:
                ready = False
            if not ready and not timed_out and SETUP_FAILED in result.stderr:
                raise SandboxSetupError(result.stderr.strip()[-500:])
            return result
        finally:
            os.close(ready_r)
            if ready_w >= 0:
                os.close(ready_w)
            if group is not None:
                group.remove()
            shutil.rmtree(host, ignore_errors=True)

    @staticmethod
    def _kill(proc: subprocess.Popen, group: Group | None) -> None:
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
            files: more files for its working directory, name -> text.

        Returns:
            Its result; a program that fails or misbehaves is a result, never
            an exception here (set-up failures on our side do raise OSError,
            SandboxSetupError when the box itself could not be built).
        """
        with self._slots:
            return self._execute(None, code, dict(env or {}), dict(files or {}))

    def run_command(self, argv: list[str], files: dict | None = None, env: dict | None = None,
                    cwd: str | None = None) -> RunResult:
        """Run a command (not a Python program) in the same box and limits.

        `argv[0]` must be an absolute path the box can see (the interpreter,
        or inside `extra_paths`); `files` are written to its working directory
        /tmp/box (the "none" mode: a fresh host directory), which "{workdir}"
        in `argv` names; `cwd` (default that directory) must be visible inside.
        """
        if not argv or not os.path.isabs(argv[0]):
            raise ValueError(f"run_command needs an absolute executable path, got {argv[:1]}")
        with self._slots:
            return self._execute(list(argv), "", dict(env or {}), dict(files or {}), cwd)

    def run_many(self, codes: list[str], files: list[dict] | None = None) -> list[RunResult]:
        """Run programs in parallel, up to `max_parallel` at once, results in order."""
        files = files or [{} for _ in codes]
        with ThreadPoolExecutor(max_workers=self.max_parallel) as pool:
            return list(pool.map(lambda c, f: self.run(c, files=f), codes, files))
