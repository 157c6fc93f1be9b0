"""What a sandboxed program may see: the paths of its minimal root file system.

The sandbox's first process (sandbox_init.py) builds a new, empty root (a
small tmpfs) and bind-mounts into it, read-only, only what `root_plan`
lists: the interpreter binary, its standard library, the directories of the
shared libraries they load (found with `ldd`; e.g. /usr/lib/x86_64-linux-gnu:
system libraries only), /etc/ld.so.cache, and any extra paths a caller
names (e.g. a Lean toolchain). Symbolic links met on the way to those paths
(/lib -> usr/lib, a venv's python -> the real one) are recreated as links.
Everything else - the project checkout, datasets, /root, /home, /run and its
sockets, /sys - is simply absent. It also gets /dev/null, /dev/zero,
/dev/full, /dev/random, /dev/urandom, a private /proc, and size-capped
private /tmp and /dev/shm (made by the init, not listed here).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess

_LDD_PATH = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


def _walk(path: str, links: dict[str, str]) -> str:
    """The real path of `path`, recording every symbolic link met on the way."""
    path = os.path.normpath(os.path.abspath(path))
    for _ in range(64):
        parts, current = path.split("/")[1:], ""
        for i, part in enumerate(parts):
            candidate = f"{current}/{part}"
            if os.path.islink(candidate):
                target = os.readlink(candidate)
                links[candidate] = target
                path = os.path.normpath(os.path.join(os.path.dirname(candidate), target,
                                                     *parts[i + 1:]))
                break
            current = candidate
        else:
            return path or "/"
    raise OSError(f"too many symbolic links resolving {path}")


def _clean_env() -> dict[str, str]:
    """The environment the boxed programs get (PATH only): the libraries ldd
    finds must be the ones they load, whatever LD_LIBRARY_PATH or LD_PRELOAD
    this process carries (vLLM's import sets LD_LIBRARY_PATH, for example)."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def _shared_libraries(binaries: list[str]) -> list[str]:
    """Shared libraries (and the loader) `binaries` need, as ldd names them."""
    ldd = shutil.which("ldd")
    if not ldd or not binaries:
        return []
    found: list[str] = []
    for start in range(0, len(binaries), 64):
        out = subprocess.run([ldd, *binaries[start:start + 64]], capture_output=True, text=True,
                             timeout=60, env=_clean_env()).stdout
        found.extend(m.group(1) for m in _LDD_PATH.finditer(out))
    return list(dict.fromkeys(found))


@functools.lru_cache(maxsize=16)
def _python_paths(python: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The interpreter's own paths (binary, stdlib, lib-dynload) and the libraries they load."""
    probe = ("import json, sys, sysconfig; print(json.dumps([sys.executable, "
             "sysconfig.get_paths()['stdlib'], sysconfig.get_paths()['platstdlib'], *sys.path]))")
    out = subprocess.run([python, "-I", "-S", "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True, env=_clean_env()).stdout
    paths = [p for p in json.loads(out) if p and os.path.exists(p)]
    modules = []
    for p in paths[1:]:
        if os.path.isdir(p) and os.path.basename(p) == "lib-dynload":
            modules += [os.path.join(p, f) for f in sorted(os.listdir(p)) if f.endswith(".so")]
    return tuple(dict.fromkeys([python, *paths])), tuple(_shared_libraries([paths[0], *modules]))


@functools.lru_cache(maxsize=64)
def root_plan(python: str, extra: tuple[str, ...] = ()) -> dict:
    """Read-only binds and links of the minimal root for `python` (+ `extra` paths).

    Returns {"binds": [real paths, outermost first, none inside another],
    "links": {link path: target}} (cached: callers must not change it).
    """
    links: dict[str, str] = {}
    own, libraries = _python_paths(python)
    wanted = [*own, "/etc/ld.so.cache", *extra]
    reals = {_walk(p, links) for p in wanted if os.path.exists(p)}
    # a library's whole directory: one bind instead of dozens (about 15 ms a program)
    reals |= {os.path.dirname(_walk(p, links)) for p in libraries if os.path.exists(p)}
    binds: list[str] = []
    for real in sorted(reals, key=lambda p: (p.count("/"), p)):
        if not any(real == b or real.startswith(b.rstrip("/") + "/") for b in binds):
            binds.append(real)
    # a bind would hide a link recorded inside it only if the link lies in a bound
    # directory, where the bind shows the same link anyway: drop those
    inside = [k for k in links if any(k.startswith(b.rstrip("/") + "/") for b in binds)]
    for k in inside:
        del links[k]
    return {"binds": binds, "links": links}
