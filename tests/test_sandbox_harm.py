"""Host harm, measured: what a sandboxed program takes stays within its limits.

Each test runs a hostile program and counts its effect on the host: the
kernel's own counters of the program's cgroup (peak memory, CPU time), the
host's /proc/meminfo, connections that reached a host socket, files it saw.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO
from rapid_async.tasks.sandbox import Limits, Sandbox

MiB = 1 << 20


def _cgroup_box(**limits) -> Sandbox:
    box = Sandbox(Limits(**limits), max_parallel=1)
    if box._cgroup is None:
        pytest.skip(f"no cgroup here: {box.limits_enforced[-2]}")
    return box


def _meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class _Sampler:
    """Largest value of /proc/meminfo `field` while the block runs (every 10 ms)."""

    def __init__(self, field: str):
        self.field, self.peak, self._stop = field, _meminfo(field), threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _meminfo(self.field))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


CHILDREN_ALLOCATE = """
import os, time
pids = []
for i in range(6):
    pid = os.fork()
    if pid == 0:
        block = b"x" * (180 << 20)   # 180 MiB, every page written
        print("held", i, flush=True)
        time.sleep(2)
        os._exit(0)
    pids.append(pid)
killed = sum(os.WIFSIGNALED(os.waitpid(p, 0)[1]) for p in pids)
print("killed", killed, flush=True)
"""


def test_children_together_stay_within_the_whole_program_memory_limit():
    box = _cgroup_box(wall_s=60, memory_mb=512, total_memory_mb=256, processes=16)
    result = box.run(CHILDREN_ALLOCATE)
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and lines[-1].startswith("killed"), result.stderr
    killed = int(lines[-1].split()[1])
    # 6 x 180 MiB would be 1080 MiB; the kernel's peak for the whole program:
    assert result.memory_peak_bytes is not None
    assert 150 * MiB < result.memory_peak_bytes <= 256 * MiB + MiB, result.memory_peak_bytes
    assert killed >= 4, lines  # at most one 180 MiB block fits at a time (two in sequence)


BUSY_CHILDREN = """
import os
for i in range(6):
    if os.fork() == 0:
        while True:
            pass
while True:
    pass
"""


def test_busy_children_together_get_the_cpu_quota():
    box = _cgroup_box(wall_s=4, cpu_s=60, cpus=0.25, processes=16)
    result = box.run(BUSY_CHILDREN)
    assert result.timed_out and result.cpu_s is not None
    # 7 busy processes could use both host cores for the whole run (2 x wall);
    # the quota allows a quarter of one (CFS periods of 100 ms: a small margin)
    assert result.cpu_s <= 0.25 * result.seconds * 1.1 + 0.05, (result.cpu_s, result.seconds)
    assert result.cpu_s >= 0.02 * result.seconds  # it did run (the counter counts)


SHM_HOG = """
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
IPC_CREAT = 0o1000
big = libc.shmget(0, 64 << 20, IPC_CREAT | 0o600)
print("big", big, flush=True)
total = 0
for _ in range(40):                       # 40 x 8 MiB = 320 MiB if nothing stops it
    sid = libc.shmget(0, 8 << 20, IPC_CREAT | 0o600)
    if sid < 0:
        break
    addr = libc.shmat(sid, None, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        break
    ctypes.memset(addr, 1, 8 << 20)
    total += 8 << 20
print("total", total, flush=True)
time.sleep(1.5)
"""


def test_sysv_shared_memory_is_capped_and_host_shmem_does_not_grow():
    box = Sandbox(Limits(wall_s=30, memory_mb=1024, total_memory_mb=512, shm_mb=32), max_parallel=1)
    if box.isolation == "none":
        pytest.skip("isolation 'none' has no IPC namespace")
    before = _meminfo("Shmem")
    with _Sampler("Shmem") as sampler:
        result = box.run(SHM_HOG)
    out = dict(line.split() for line in result.stdout.splitlines())
    assert result.returncode == 0, result.stderr
    assert int(out["big"]) == -1                     # a segment over shmmax is refused
    assert 0 < int(out["total"]) <= 32 * MiB         # shmall: 32 MiB in all
    # other sessions on this machine use shared memory too: a 48 MiB margin
    assert sampler.peak - before <= 32 * MiB + 48 * MiB, (sampler.peak - before) / MiB
    assert sampler.peak - before >= 16 * MiB           # the sampler saw the segments
    # freed with the IPC namespace (the kernel frees it a moment after the exit)
    for _ in range(100):
        if _meminfo("Shmem") - before <= 16 * MiB:
            break
        time.sleep(0.1)
    assert _meminfo("Shmem") - before <= 16 * MiB


def test_private_tmpfs_is_size_capped():
    box = Sandbox(Limits(wall_s=30, file_mb=4, tmpfs_mb=16), max_parallel=1)
    if box.isolation == "none":
        pytest.skip("isolation 'none' has no private tmpfs")
    code = ("total = 0\nfor d in ('/tmp', '/dev/shm'):\n    for i in range(10):\n"
            "        try:\n            with open(f'{d}/f{i}', 'wb') as f:\n"
            "                f.write(b'x' * (3 << 20))\n            total += 3 << 20\n"
            "        except OSError:\n            pass\n    print(d, total)\n    total = 0\n")
    result = box.run(code)
    sizes = [int(line.split()[1]) for line in result.stdout.splitlines()]
    assert len(sizes) == 2 and all(0 < s <= 16 * MiB for s in sizes), result.stdout + result.stderr


def test_host_unix_sockets_are_unreachable(tmp_path):
    box = Sandbox(Limits(wall_s=10), max_parallel=1)
    if box.isolation == "none":
        pytest.skip("isolation 'none' has no network or mount namespace")
    tag = secrets.token_hex(4)
    paths = [f"/run/rapid-test-{tag}.sock", str(tmp_path / "host.sock"), f"\0rapid-test-{tag}"]
    servers = []
    try:
        for path in paths:
            server = socket.socket(socket.AF_UNIX)
            server.bind(path)
            server.listen(4)
            server.setblocking(False)
            servers.append(server)
        code = ("import socket\nfor p in %r:\n    s = socket.socket(socket.AF_UNIX)\n"
                "    try:\n        s.connect(p)\n        s.sendall(b'leak')\n        print('connected')\n"
                "    except OSError as e:\n        print('refused', e.errno)\n" % paths)
        result = box.run(code)
        assert result.stdout.split().count("refused") == 3, result.stdout + result.stderr
        for server in servers:  # a connection would wait in the backlog: none did
            with pytest.raises(BlockingIOError):
                server.accept()
    finally:
        for server in servers:
            server.close()
        Path(paths[0]).unlink(missing_ok=True)


def test_project_datasets_and_home_are_invisible():
    box = Sandbox(Limits(wall_s=10), max_parallel=1)
    if box.isolation == "none":
        pytest.skip("isolation 'none' has no mount namespace")
    # The checkout itself may hold the interpreter (.venv), whose own directories
    # are bound read-only: its source, tests and README must not be there.
    hidden = [str(REPO / "rapid_async"), str(REPO / "tests"), str(REPO / "README.md"),
              "/work/shared/data", "/home",
              "/root/.bashrc", "/root/.ssh", "/run", "/var/run", "/sys", "/etc/passwd", "/var"]
    code = ("import json, os\nprint(json.dumps({'seen': [p for p in %r if os.path.exists(p)],"
            " 'root': os.listdir('/root') if os.path.isdir('/root') else [],"
            " 'mounts': open('/proc/self/mountinfo').read()}))\n" % hidden)
    result = box.run(code)
    report = json.loads(result.stdout)
    assert report["seen"] == [], report["seen"]
    # Mount points (field 5 of mountinfo) under the checkout or /work are only the
    # interpreter's own prefix (a venv inside the checkout), never the rest.
    prefix = str(Path(box.python).parent.parent)
    points = [line.split()[4] for line in report["mounts"].splitlines()]
    leaked = [m for m in points if (m.startswith(str(REPO)) or m.startswith("/work"))
              and not (m == prefix or m.startswith(prefix + "/"))]
    assert leaked == [], leaked
    assert not any(m.startswith("/work/shared") for m in points)
    real = str(Path(box.python).resolve())  # a venv's python links to the base interpreter
    python_top = Path(real).parts[2] if real.startswith("/root/") else None
    assert set(report["root"]) <= {python_top}, report["root"]


ESCAPE_MOUNTS = r"""
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
def call(f, *args):
    rc = f(*args)
    return rc if rc == 0 else -ctypes.get_errno()
stdlib = os.path.dirname(os.__file__).encode()
tries = {
    "mount_tmpfs": call(libc.mount, b"tmpfs", b"/tmp", b"tmpfs", 0, None),
    "umount_tmp": call(libc.umount2, b"/tmp", 2),
    "remount_root_rw": call(libc.mount, None, b"/", None, 32, None),
    "remount_stdlib_rw": call(libc.mount, None, stdlib, None, 32 | 4096, None),
    "mount_proc": call(libc.mount, b"proc", b"/tmp", b"proc", 0, None),
}
try:
    open(os.path.join(stdlib.decode(), "planted.py"), "w").write("x")
    tries["write_stdlib"] = 0
except OSError as e:
    tries["write_stdlib"] = -e.errno
status = dict(l.split(":\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\t" in l)
# a nested user namespace gives capabilities there, but the box's mounts stay locked
nested = call(libc.unshare, 0x10000000 | 0x00020000)   # CLONE_NEWUSER | CLONE_NEWNS
if nested == 0:
    tries["nested_remount_stdlib_rw"] = call(libc.mount, None, stdlib, None, 32 | 4096, None)
    tries["nested_umount_tmp"] = call(libc.umount2, b"/tmp", 2)
print(json.dumps({"tries": tries, "caps": [status[k].strip() for k in
                  ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")],
                  "nnp": status["NoNewPrivs"].strip(), "nested_userns": nested}))
"""


def _check_no_mounts(out: str, python: str) -> dict:
    report = json.loads(out)
    assert all(rc < 0 for rc in report["tries"].values()), report["tries"]
    assert len(report["tries"]) >= 6
    assert report["caps"] == ["0000000000000000"] * 5 and report["nnp"] == "1", report
    assert not list(Path(python).resolve().parents[1].glob("lib/python3*/planted.py"))
    return report


def test_no_capabilities_so_mounts_fail():
    box = Sandbox(Limits(wall_s=10), max_parallel=1)
    if box.isolation == "none":
        pytest.skip("isolation 'none' has no mount namespace")
    result = box.run(ESCAPE_MOUNTS)
    assert result.returncode == 0, result.stderr
    _check_no_mounts(result.stdout, box.python)


def test_userns_mode_drops_every_capability_so_mounts_fail():
    """The path a non-root user takes (most GPU nodes): run as `nobody`."""
    if os.geteuid() != 0 or shutil.which("su") is None or not Path("/usr/bin/python3").exists():
        pytest.skip("needs root (to become nobody), su and /usr/bin/python3")
    if any(not p.stat().st_mode & stat.S_IXOTH for p in [REPO, *REPO.parents]):
        pytest.skip("the checkout is not readable by other users")
    script = ("import sys\nfrom rapid_async.tasks.sandbox import Limits, Sandbox\n"
              "s = Sandbox(Limits(wall_s=10))\nprint('mode', s.isolation)\n"
              "r = s.run(sys.stdin.read())\nprint(r.stdout.strip())\nprint(r.stderr, file=sys.stderr)\n")
    out = subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c",
                          f"cd /tmp && PYTHONPATH={REPO} /usr/bin/python3 -c {shlex_quote(script)}"],
                         input=ESCAPE_MOUNTS, capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    if "mode none" in lines:
        pytest.skip("unprivileged user namespaces are not allowed here")
    assert lines and lines[0] == "mode userns", out.stdout + out.stderr
    report = _check_no_mounts(lines[1], "/usr/bin/python3")
    assert report["nested_userns"] < 0  # max_user_namespaces = 0 in its own user namespace


def shlex_quote(text: str) -> str:
    import shlex
    return shlex.quote(text)


FORK_UNTIL_REFUSED = """
import os, time
n = 0
for _ in range(200):
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        n += 1
    except OSError:
        break
print("forked", n, flush=True)
"""


def test_process_count_is_capped_and_groups_are_removed():
    box = _cgroup_box(wall_s=20, processes=8)
    result = box.run(FORK_UNTIL_REFUSED)
    assert result.stdout.startswith("forked"), result.stderr
    assert int(result.stdout.split()[1]) < 8  # pids.max (and RLIMIT_NPROC) counts the parent too
    leftovers = [d for parent in box._cgroup.parents.values()
                 for d in parent.glob(f"rapid-box-{os.getpid()}-*")]
    assert leftovers == []  # every program's group was removed after it


def test_cgroup_v2_files_written(tmp_path):
    """The v2 backend's settings, written to a plain directory (this machine is v1)."""
    from rapid_async.tasks.sandbox_cgroup import Backend

    group = Backend("v2", {"unified": tmp_path}).create(256 * MiB, 0.25, 12)
    d = group.dirs[0]
    written = {f.name: f.read_text() for f in d.iterdir()}
    assert written == {"memory.max": str(256 * MiB), "memory.swap.max": "0",
                       "memory.oom.group": "1", "pids.max": "12", "cpu.max": "25000 100000"}
    assert group.procs == [str(d / "cgroup.procs")]
    (d / "memory.peak").write_text("1234\n")
    (d / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 1\nsystem_usec 2\n")
    assert group.usage() == (1234, 2.5)


def test_tmpfs_pages_count_against_the_memory_limit():
    """A big private tmpfs does not lift the whole-program memory limit."""
    box = _cgroup_box(wall_s=30, file_mb=16, tmpfs_mb=512, total_memory_mb=96)
    code = ("import os\nwritten = 0\ntry:\n    for i in range(20):\n"
            "        with open(f'/dev/shm/f{i}', 'wb') as f:\n            f.write(b'x' * (10 << 20))\n"
            "        written += 10 << 20\n        print('written', written, flush=True)\n"
            "except OSError as e:\n    print('refused', e.errno, flush=True)\n")
    result = box.run(code)
    written = [int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("written")]
    assert max(written, default=0) <= 96 * MiB, result.stdout  # 200 MiB asked for
    assert result.memory_peak_bytes is not None and result.memory_peak_bytes <= 96 * MiB + MiB


def test_a_failed_mount_stops_the_box_before_the_program_runs(monkeypatch):
    import rapid_async.tasks.sandbox as sandbox_module
    from rapid_async.tasks.sandbox import SandboxSetupError

    box = Sandbox(Limits(wall_s=10), max_parallel=1)
    if box.isolation == "none":
        pytest.skip("isolation 'none' mounts nothing")
    real = sandbox_module.root_plan
    broken = lambda python, extra: {**real(python, extra),  # noqa: E731
                                    "binds": [*real(python, extra)["binds"], "/no-such-dir-rapid"]}
    monkeypatch.setattr(sandbox_module, "root_plan", broken)
    with pytest.raises(SandboxSetupError, match="mount /no-such-dir-rapid"):
        box.run("print('the program ran')\n")
