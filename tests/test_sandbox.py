"""The sandbox: hostile programs fail and leave the host unharmed."""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path

import pytest

from conftest import REPO
from rapid_async.tasks.sandbox import Limits, Sandbox


@pytest.fixture(scope="module")
def box():
    return Sandbox(Limits(wall_s=3.0, cpu_s=10, memory_mb=512, processes=16, file_mb=1),
                   max_parallel=2)


def _tagged_processes(tag: str) -> list[int]:
    """Host pids whose environment carries `tag` (the sandbox's children)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if tag.encode() in Path(entry.path, "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_a_plain_program_runs_in_a_fresh_directory_with_a_scrubbed_environment(box, monkeypatch):
    monkeypatch.setenv("RAPID_TEST_SECRET", "s3cr3t-value")
    code = ("import os\nprint(sorted(os.environ))\nprint(os.listdir('.'))\n"
            "print(open('/proc/1/environ', 'rb').read() if os.path.exists('/proc/1/environ') else b'')\n")
    result = box.run(code)
    assert result.returncode == 0, result.stderr
    assert "s3cr3t" not in result.stdout and "RAPID_TEST_SECRET" not in result.stdout
    assert "['main.py']" in result.stdout.splitlines()[1]
    assert box.isolation in ("namespaces", "userns", "none")


def test_infinite_loops_are_killed_at_the_wall_clock_limit(box):
    t0 = time.monotonic()
    for code in ("while True:\n    pass\n", "import time\ntime.sleep(600)\n"):
        result = box.run(code)
        assert result.returncode != 0
    assert time.monotonic() - t0 < 3 * 2 + 4


def test_memory_bomb_fails(box):
    result = box.run("x = bytearray(8 << 30)\nprint('allocated')\n")
    assert result.returncode != 0 and "allocated" not in result.stdout
    result = box.run("x = []\nwhile True:\n    x.append(' ' * 10**7)\n")
    assert result.returncode != 0


def test_fork_bomb_is_capped_and_leaves_no_process_behind(box):
    tag = f"RAPID_FORK_TAG_{secrets.token_hex(4)}"
    code = ("import os, time\nn = 0\nfor _ in range(10000):\n    try:\n        os.fork()\n"
            "        n += 1\n    except OSError:\n        break\nprint('forked', n, flush=True)\n"
            "time.sleep(600)\n")
    result = box.run(code, env={tag: "1"})
    assert result.returncode != 0
    counts = [int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("forked")]
    if box.isolation != "userns" or os.geteuid() != 0:
        assert counts and max(counts) < 16  # RLIMIT_NPROC held
    time.sleep(0.5)
    assert _tagged_processes(tag) == []


def test_writes_outside_the_temporary_directory_do_not_reach_the_host(box, tmp_path):
    targets = [REPO / f"escape-{secrets.token_hex(4)}.txt", tmp_path / "escape.txt",
               Path.home() / f"escape-{secrets.token_hex(4)}.txt"]
    code = "".join(f"try:\n    open({str(t)!r}, 'w').write('x')\nexcept OSError as e:\n    print(e)\n"
                   for t in targets)
    box.run(code)
    assert not any(t.exists() for t in targets)
    if box.isolation != "none":  # private /tmp: even /tmp writes vanish
        name = f"/tmp/rapid-escape-{secrets.token_hex(4)}"
        assert box.run(f"open({name!r}, 'w').write('x')\nprint('ok')\n").stdout.strip() == "ok"
        assert not os.path.exists(name)


def test_no_network(box):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        code = ("import socket\ns = socket.create_connection(('127.0.0.1', %d), timeout=2)\n"
                "s.sendall(b'leak')\nprint('connected')\n" % port)
        result = box.run(code)
        if box.isolation == "none":
            pytest.skip("isolation 'none' has no network namespace")
        assert "connected" not in result.stdout and result.returncode != 0
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


def test_huge_output_is_cut_and_kills_the_program(box):
    t0 = time.monotonic()
    result = box.run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n")
    assert result.returncode != 0 and len(result.stdout) <= box.limits.output_bytes
    assert time.monotonic() - t0 < 5


def test_programs_run_in_parallel_up_to_the_limit():
    box = Sandbox(Limits(wall_s=10), max_parallel=2)
    t0 = time.monotonic()
    results = box.run_many(["import time\ntime.sleep(1)\nprint('done')\n"] * 4)
    elapsed = time.monotonic() - t0
    assert [r.stdout.strip() for r in results] == ["done"] * 4
    assert 1.9 < elapsed < 3.9  # two at a time: two rounds of one second


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_parallel"):
        Sandbox(max_parallel=0)
    with pytest.raises(ValueError, match="isolation = 'docker'"):
        Sandbox(isolation="docker")
    with pytest.raises(ValueError, match="wall_s"):
        Limits(wall_s=0)


def test_unprivileged_users_get_the_userns_mode():
    """The path a non-root user takes (most GPU nodes): run as `nobody`."""
    import shutil
    import stat
    import subprocess

    if os.geteuid() != 0 or shutil.which("su") is None or not Path("/usr/bin/python3").exists():
        pytest.skip("needs root (to become nobody), su and /usr/bin/python3")
    if any(not p.stat().st_mode & stat.S_IXOTH for p in [REPO, *REPO.parents]):
        pytest.skip("the checkout is not readable by other users")
    script = (
        "from rapid_async.tasks.sandbox import Limits, Sandbox\n"
        "s = Sandbox(Limits(wall_s=3, cpu_s=3, processes=16))\n"
        "print('mode', s.isolation)\n"
        "r = s.run(\"import socket\\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\\n\")\n"
        "print('net', r.returncode, 'unreachable' in r.stderr)\n"
        "r = s.run(\"open('/tmp/rapid-nobody-escape', 'w').write('x')\\nprint('wrote')\\n\")\n"
        "print('tmp', r.stdout.strip())\n")
    out = subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c",
                          f"cd /tmp && PYTHONPATH={REPO} /usr/bin/python3 -"],
                         input=script, capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    if "mode none" in lines:
        pytest.skip("unprivileged user namespaces are not allowed here")
    assert lines[:3] == ["mode userns", "net 1 True", "tmp wrote"], out.stdout + out.stderr
    assert not os.path.exists("/tmp/rapid-nobody-escape")
