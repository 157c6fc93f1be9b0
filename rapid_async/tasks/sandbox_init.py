"""The first process inside the sandbox: set the box up, then become the program.

Run by `rapid_async.tasks.sandbox` as `python -I -S sandbox_init.py` (standard
library only: no site-packages, no rapid_async import), with one JSON object
on stdin:

    {"code": program text, "files": {name: text} written beside it,
     "mount": bool, "uid": int or null,
     "limits": {"cpu_s", "memory_bytes", "file_bytes", "processes", "open_files"},
     "env": {...}, "python": interpreter path, "workdir": path or null}

In the "namespaces" and "userns" modes it runs as pid 1 of fresh PID, mount,
network, IPC and UTS namespaces (made by `unshare`), still privileged inside
them. It then:
1. makes its view of every file system read-only, then mounts fresh,
   size-limited tmpfs file systems over /tmp, /var/tmp and /dev/shm (private
   to this box: writes there vanish with it),
2. writes the program into a new directory of the new /tmp,
3. sets resource limits (CPU time, address space, file size, process count,
   open files, no core dumps),
4. drops to an unprivileged uid (when one is given: the host ran us as root),
5. replaces itself with `python -I -S main.py` in a scrubbed environment.
In the "none" mode the host made the work directory and only 2-5 apply.
"""

import ctypes
import json
import os
import resource
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
_KEEP = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024,
         "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24}
"""Per-mount flags a read-only remount must repeat (a user namespace may not drop them)."""


def _readonly_mounts() -> None:
    """Remount every mount of this (private) mount namespace read-only.

    Best effort, mount by mount: the host's file systems are untouched (the
    namespace is private), only this box's view of them becomes read-only.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        entries = [line.split() for line in f]
    for fields in entries:
        target = fields[4].encode().decode("unicode_escape")
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in fields[5].split(","):
            flags |= _KEEP.get(option, 0)
        libc.mount(None, target.encode(), None, flags, None)


def _mount_tmpfs(target: str, size_bytes: int) -> None:
    """Mount a private tmpfs over `target` (skipped where it does not exist)."""
    if not os.path.isdir(target):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    options = f"size={size_bytes},mode=1777".encode()
    if libc.mount(b"tmpfs", target.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount tmpfs on {target}: {os.strerror(err)}")


def _limit(which: int, value: int) -> None:
    resource.setrlimit(which, (value, value))


def main() -> None:
    cfg = json.loads(sys.stdin.read())
    limits = cfg["limits"]
    if cfg["mount"]:
        _readonly_mounts()
        for target in ("/tmp", "/var/tmp", "/dev/shm"):
            _mount_tmpfs(target, max(limits["file_bytes"] * 4, 16 << 20))
    workdir = cfg["workdir"] or os.path.join("/tmp", "box")
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    files = {"main.py": cfg["code"], **cfg["files"]}
    uid = cfg["uid"]
    for name, text in files.items():
        target = os.path.join(workdir, os.path.basename(name))
        with open(target, "w", encoding="utf-8") as f:
            f.write(text)
        if uid is not None:
            os.chown(target, uid, uid)
    if uid is not None:
        os.chown(workdir, uid, uid)
    os.chdir(workdir)
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_CPU, limits["cpu_s"])
    _limit(resource.RLIMIT_AS, limits["memory_bytes"])
    _limit(resource.RLIMIT_FSIZE, limits["file_bytes"])
    _limit(resource.RLIMIT_NOFILE, limits["open_files"])
    _limit(resource.RLIMIT_NPROC, limits["processes"])
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    sys.stdin.close()
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", **cfg["env"]}
    os.execve(cfg["python"], [cfg["python"], "-I", "-S", "main.py"], env)


if __name__ == "__main__":
    main()
