"""The first process inside the sandbox: set the box up, then become the program.

Run by `rapid_async.tasks.sandbox` as `python -I -S sandbox_init.py` (standard
library only: no site-packages, no rapid_async import), with one JSON object
on stdin:

    {"code": program text, "files": {name: text} written beside it,
     "argv": command or null (null: python -I -S main.py; "{workdir}" in it
             becomes the program's directory), "python": path,
     "root": {"binds": [...], "links": {...}} or null, "uid": int or null,
     "userns": bool, "cgroup_procs": [cgroup.procs paths], "ready_fd": int,
     "limits": {"cpu_s", "memory_bytes", "file_bytes", "processes",
                "open_files", "shm_bytes", "tmpfs_bytes"},
     "env": {...}, "workdir": path or null}

In the "namespaces" and "userns" modes it runs as pid 1 of fresh PID, mount,
network, IPC and UTS namespaces (made by `unshare`), still privileged inside
them. Every step is checked; any failure ends it with status 125 and a line
"rapid-sandbox setup failed: ..." on stderr before the program runs (fail
closed). It:
1. joins the program's control groups (whole-program memory, CPU, pids),
2. caps SysV shared memory and message queues of its IPC namespace (and,
   in "userns" mode, forbids nested user namespaces),
3. builds a minimal root: a small tmpfs holding read-only binds of only the
   paths in "root" (interpreter, stdlib, shared libraries, extras), five
   device nodes, a private /proc, size-capped private /tmp and /dev/shm;
   pivots into it, detaches the old root, makes the new root read-only,
4. writes the program into /tmp/box and sets resource limits,
5. drops to an unprivileged uid (when one is given: the host ran us as
   root), empties every capability set (bounding, ambient, effective,
   permitted, inheritable), locks the root securebits, sets no_new_privs,
   and checks /proc/self/status says so,
6. tells the host it is ready (a byte on ready_fd) and execs the program in a
   scrubbed environment.
In the "none" mode there is no root: the host made the work directory, and
steps 1 and 4-6 apply.
"""

import ctypes
import json
import os
import resource
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
MNT_DETACH = 2
_ST_TO_MS = {2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME, 2048: MS_NODIRATIME,
             4096: MS_RELATIME}
"""statvfs flags a read-only remount must repeat (a user namespace may not drop them)."""
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217}
PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_CAP_AMBIENT, PR_SET_NO_NEW_PRIVS = 24, 28, 47, 38
SECURE_LOCKED_ROOT = 0x2F  # NOROOT, NOROOT_LOCKED, NO_SETUID_FIXUP(+LOCKED), KEEP_CAPS_LOCKED
DEVICES = ("null", "zero", "full", "random", "urandom")
_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    """A step of the set-up failed: the program must not run."""


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)} (errno {err})")


def _mount(source, target: str, fstype, flags: int, data=None) -> None:
    enc = (lambda s: s.encode() if isinstance(s, str) else s)
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source or ''} on {target} (flags {flags:#x})")


def _bind(source: str, target: str, extra: int) -> None:
    """Bind `source` on `target`, then remount it with MS_RDONLY etc. in `extra`."""
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            open(target, "w").close()
    _mount(source, target, None, MS_BIND)
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | extra
    for st, ms in _ST_TO_MS.items():
        if os.statvfs(target).f_flag & st:
            flags |= ms
    _mount(None, target, None, flags)
    if extra & MS_RDONLY and not os.statvfs(target).f_flag & 1:
        raise SetupError(f"{target} is still writable after a read-only remount")


def _join_cgroups(procs: list) -> None:
    for path in procs:
        try:
            with open(path, "w", encoding="ascii") as f:
                f.write("0")
        except OSError as e:
            raise SetupError(f"joining cgroup {path}: {e}") from e


def _cap_ipc(limits: dict) -> None:
    """SysV limits of this (private) IPC namespace: total and largest shm, queues."""
    page = os.sysconf("SC_PAGE_SIZE")
    values = {"shmmax": limits["shm_bytes"], "shmall": max(1, limits["shm_bytes"] // page),
              "shmmni": 32, "msgmni": 8, "msgmnb": 65536, "msgmax": 8192}
    for name, value in values.items():
        try:
            with open(f"/proc/sys/kernel/{name}", "w", encoding="ascii") as f:
                f.write(str(value))
        except OSError as e:
            raise SetupError(f"setting kernel.{name} in the IPC namespace: {e}") from e


def _no_nested_user_namespaces() -> None:
    """In our own user namespace: forbid the program to make more (best effort).

    The limit is per user namespace (the host's stays as it is); kernels
    without it leave nested namespaces possible, which gain nothing over the
    box's locked mounts.
    """
    try:
        with open("/proc/sys/user/max_user_namespaces", "w", encoding="ascii") as f:
            f.write("0")
    except OSError:
        pass


def _build_root(plan: dict, limits: dict) -> None:
    """Make ./root the minimal root and pivot into it (see the module docstring)."""
    root = os.path.abspath("root")
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for sub in ("proc", "tmp", "dev/shm", "etc"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    size = f"size={limits['tmpfs_bytes']},mode=1777"
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, size)
    _mount("tmpfs", root + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, size)
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for name in DEVICES:
        _bind(f"/dev/{name}", f"{root}/dev/{name}", MS_NOEXEC)
    for path in plan["binds"]:
        _bind(path, root + path, MS_RDONLY | MS_NODEV)
    for link, target in sorted(plan["links"].items()):
        os.makedirs(os.path.dirname(root + link), exist_ok=True)
        if not os.path.lexists(root + link):
            os.symlink(target, root + link)
    os.chdir(root)
    os.mkdir(".old")
    number = PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise SetupError(f"pivot_root: unknown system call number on {os.uname().machine}")
    _check(_libc.syscall(number, b".", b".old"), "pivot_root")
    os.chdir("/")
    _check(_libc.umount2(b"/.old", MNT_DETACH), "detaching the old root")
    os.rmdir("/.old")


def _write_files(workdir: str, files: dict, uid) -> None:
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    for name, text in files.items():
        target = os.path.join(workdir, os.path.basename(name))
        with open(target, "w", encoding="utf-8") as f:
            f.write(text)
        if uid is not None:
            os.chown(target, uid, uid)
    if uid is not None:
        os.chown(workdir, uid, uid)


def _set_limits(limits: dict) -> None:
    for which, key in ((resource.RLIMIT_CPU, "cpu_s"), (resource.RLIMIT_AS, "memory_bytes"),
                       (resource.RLIMIT_FSIZE, "file_bytes"), (resource.RLIMIT_NOFILE, "open_files"),
                       (resource.RLIMIT_NPROC, "processes")):
        resource.setrlimit(which, (limits[key], limits[key]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_MSGQUEUE, (0, 0))


def _status() -> dict:
    with open("/proc/self/status", encoding="ascii") as f:
        return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)


def _drop_privileges(uid) -> None:
    """Empty every capability set, lock root's securebits, set no_new_privs.

    Without CAP_SETPCAP (an unprivileged user in the "none" mode) the bounding
    set cannot be emptied; such a process holds no capability and, with
    no_new_privs, can gain none.
    """
    with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
        last = int(f.read())
    privileged = int(_status().get("CapEff", "0"), 16) & (1 << 8)  # CAP_SETPCAP
    if privileged:
        _check(_libc.prctl(PR_SET_SECUREBITS, SECURE_LOCKED_ROOT, 0, 0, 0), "locking securebits")
        for cap in range(last + 1):
            _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping capability {cap}")
    _check(_libc.prctl(PR_CAP_AMBIENT, 4, 0, 0, 0), "clearing ambient capabilities")
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()
    _check(_libc.capset(header, data), "capset (clearing capabilities)")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "setting no_new_privs")
    status = _status()
    for key in ("CapInh", "CapPrm", "CapEff", "CapAmb") + (("CapBnd",) if privileged else ()):
        if int(status.get(key, "1"), 16) != 0:
            raise SetupError(f"{key} is {status.get(key)!r} after dropping capabilities")
    if status.get("NoNewPrivs", "0").strip() != "1":
        raise SetupError("no_new_privs did not hold")


def main() -> None:
    cfg = json.loads(sys.stdin.read())
    limits = cfg["limits"]
    _join_cgroups(cfg["cgroup_procs"])
    if cfg["root"] is not None:
        _cap_ipc(limits)
        if cfg["userns"]:
            _no_nested_user_namespaces()
        _build_root(cfg["root"], limits)
    workdir = cfg["workdir"] or "/tmp/box"
    uid = cfg["uid"]
    _write_files(workdir, {"main.py": cfg["code"], **cfg["files"]}, uid)
    if cfg["root"] is not None:
        _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(cfg.get("cwd") or workdir)
    _set_limits(limits)
    _drop_privileges(uid)
    sys.stdin.close()
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", **cfg["env"]}
    argv = [a.replace("{workdir}", workdir) for a in cfg["argv"] or [cfg["python"], "-I", "-S", "main.py"]]
    os.write(cfg["ready_fd"], b"ok")
    os.close(cfg["ready_fd"])
    try:
        os.execve(argv[0], argv, env)
    except OSError as e:  # the box is ready: the program itself cannot start
        sys.stderr.write(f"rapid-sandbox: cannot run {argv[0]}: {e}\n")
        sys.stderr.flush()
        os._exit(127)


if __name__ == "__main__":
    try:
        main()
    except (SetupError, OSError, ValueError, KeyError) as e:
        sys.stderr.write(f"rapid-sandbox setup failed: {e}\n")
        sys.stderr.flush()
        os._exit(125)
