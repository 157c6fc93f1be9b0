"""Whole-program limits for sandboxed programs: one control group per program.

A program and every process it starts share one cgroup, so its memory
(including the shared memory and tmpfs pages it touches), CPU share and
process count are capped together, not per process. Which cgroup file
system works is found once per Sandbox (`find_backend`), in this order:

- cgroup v2 (unified): a parent group where we may create children and the
  memory, pids and cpu controllers are enabled; each program gets a child
  with memory.max, memory.swap.max = 0, memory.oom.group = 1, pids.max and
  cpu.max. Tried: $RAPID_SANDBOX_CGROUP (a delegated group set up by an
  admin, e.g. systemd `Delegate=yes`), the root of the v2 mount, then a
  sibling of our own group.
- cgroup v1 (separate memory, cpu, cpuacct, pids hierarchies, as on this
  development machine and CI): a child of our own group in each, with
  memory.limit_in_bytes and memory.memsw.limit_in_bytes (no swap),
  cpu.cfs_quota_us and pids.max.
- none: not root and nothing delegated, or no controllers; only the
  per-process resource limits hold (logged by the Sandbox).

The program's first process joins its group itself (sandbox_init.py writes
"0" to each `procs` file listed in its config) before it runs any program
code; the host reads the usage back and removes the group afterwards.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("rapid.sandbox")
ROOT = Path("/sys/fs/cgroup")
NEEDED_V2 = ("memory", "pids", "cpu")
PERIOD_US = 100_000


def _write(path: Path, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def _own_group(controller: str) -> str:
    """Our process's group path in the hierarchy of `controller` ("" for v2)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if (controller == "" and names == "") or controller in names.split(","):
            return path
    raise OSError(f"no {controller or 'unified'} entry in /proc/self/cgroup")


@dataclass
class Group:
    """One program's control group (one directory per hierarchy)."""

    dirs: list[Path]
    procs: list[str]
    backend: "Backend"

    def usage(self) -> tuple[int | None, float | None]:
        """(peak memory bytes, CPU seconds used) as the kernel counted them."""
        return self.backend.usage(self)

    def remove(self) -> None:
        """Kill what is left in the group and remove its directories."""
        deadline = time.monotonic() + 10
        for d in self.dirs:
            while d.exists():
                try:
                    pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
                    for pid in pids:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    os.rmdir(d)
                except OSError:
                    if time.monotonic() > deadline:
                        log.warning("sandbox: could not remove cgroup %s", d)
                        break
                    time.sleep(0.01)


@dataclass
class Backend:
    """How to make program groups: `kind` is "v2" or "v1"; `parents` per hierarchy."""

    kind: str
    parents: dict[str, Path] = field(default_factory=dict)

    def describe(self, memory_mb: int, cpus: float, processes: int) -> str:
        swap = "memory.swap.max=0" if self.kind == "v2" else "memory.memsw.limit_in_bytes (no swap)"
        return (f"cgroup {self.kind} per program ({', '.join(str(p) for p in self.parents.values())}): "
                f"memory {memory_mb} MiB incl. shm/tmpfs pages, {swap}, cpu {cpus:g} core(s), "
                f"pids {processes}")

    def create(self, memory_bytes: int, cpus: float, processes: int) -> Group:
        name = f"rapid-box-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        dirs: list[Path] = []
        group = Group(dirs, [], self)
        try:
            for controller, parent in self.parents.items():
                d = parent / name
                d.mkdir()
                dirs.append(d)
                self._limit(controller, d, memory_bytes, cpus, processes)
        except OSError:
            group.remove()
            raise
        group.procs = [str(d / "cgroup.procs") for d in dirs]
        return group

    def _limit(self, controller: str, d: Path, memory: int, cpus: float, processes: int) -> None:
        quota = max(1000, int(cpus * PERIOD_US))
        if self.kind == "v2":
            _write(d / "memory.max", str(memory))
            _write(d / "memory.swap.max", "0")
            _write(d / "memory.oom.group", "1")
            _write(d / "pids.max", str(processes))
            _write(d / "cpu.max", f"{quota} {PERIOD_US}")
        elif controller == "memory":
            _write(d / "memory.limit_in_bytes", str(memory))
            if (d / "memory.memsw.limit_in_bytes").exists():
                _write(d / "memory.memsw.limit_in_bytes", str(memory))
        elif controller == "cpu":
            _write(d / "cpu.cfs_period_us", str(PERIOD_US))
            _write(d / "cpu.cfs_quota_us", str(quota))
        elif controller == "pids":
            _write(d / "pids.max", str(processes))

    def usage(self, group: Group) -> tuple[int | None, float | None]:
        peak = cpu = None
        for d in group.dirs:
            try:
                if self.kind == "v2":
                    if (d / "memory.peak").exists():
                        peak = int((d / "memory.peak").read_text())
                    stat = dict(line.split() for line in (d / "cpu.stat").read_text().splitlines())
                    cpu = int(stat["usage_usec"]) / 1e6
                elif (d / "memory.max_usage_in_bytes").exists():
                    peak = int((d / "memory.max_usage_in_bytes").read_text())
                elif (d / "cpuacct.usage").exists():
                    cpu = int((d / "cpuacct.usage").read_text()) / 1e9
            except (OSError, KeyError, ValueError):
                pass
        return peak, cpu


def _remove_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _v2_parent(mount: Path) -> Path | None:
    """A v2 group under which we can make children with memory, pids and cpu."""
    controllers = (mount / "cgroup.controllers")
    if not controllers.exists() or not set(NEEDED_V2) <= set(controllers.read_text().split()):
        return None
    candidates = []
    if os.environ.get("RAPID_SANDBOX_CGROUP"):
        candidates.append(Path(os.environ["RAPID_SANDBOX_CGROUP"]))
    candidates.append(mount)
    own = _own_group("").lstrip("/")
    if own:
        candidates.append((mount / own).parent)
    for base in candidates:
        parent = base / f"rapid-sandbox-{os.getpid()}"
        try:
            _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in NEEDED_V2))
            if not parent.exists():
                parent.mkdir()
                atexit.register(_remove_quietly, parent)
            _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in NEEDED_V2))
            return parent
        except OSError as e:
            log.debug("sandbox: cgroup v2 parent %s unusable: %s", base, e)
            _remove_quietly(parent)
    return None


def _v1_parents() -> dict[str, Path] | None:
    parents = {}
    for controller, subdir in (("memory", "memory"), ("cpu", "cpu"), ("cpuacct", "cpuacct"),
                               ("pids", "pids")):
        mount = ROOT / subdir
        if not (mount / "cgroup.procs").exists():
            if controller == "cpuacct":
                continue  # optional: only the CPU usage report needs it
            return None
        parents[controller] = mount / _own_group(controller).lstrip("/")
    return parents


def find_backend() -> tuple[Backend | None, str]:
    """The cgroup backend that works here and a line saying why (or why not)."""
    tried = []
    for mount in (ROOT, ROOT / "unified"):
        try:
            parent = _v2_parent(mount)
        except OSError as e:
            parent, _ = None, tried.append(f"v2 at {mount}: {e}")
        if parent is not None:
            backend = Backend("v2", {"unified": parent})
            return _probe(backend, tried)
        tried.append(f"v2 at {mount}: no usable group with {'+'.join(NEEDED_V2)}")
    try:
        parents = _v1_parents()
    except OSError as e:
        parents, _ = None, tried.append(f"v1: {e}")
    if parents:
        return _probe(Backend("v1", parents), tried)
    tried.append("v1: memory, cpu or pids hierarchy missing")
    return None, "; ".join(tried)


def _probe(backend: Backend, tried: list[str]) -> tuple[Backend | None, str]:
    try:
        backend.create(64 << 20, 1.0, 8).remove()
        return backend, f"cgroup {backend.kind}"
    except OSError as e:
        tried.append(f"{backend.kind}: cannot create a limited group ({e})")
        return None, "; ".join(tried)
