"""Shared fixtures: tiny model directories and helpers to run real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _find_shared_data() -> Path | None:
    """shared/data beside the clone (CI) or above the worktree (development)."""
    for parent in REPO.parents:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return None


SHARED_DATA = _find_shared_data()
"""The real datasets (GSM8K, MATH, MBPP, MiniF2F), or None where not present."""


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="also run the tests marked `full` (whole datasets, the same "
                          "end-to-end path on a second engine); bin/test-full passes it")


def pytest_collection_modifyitems(config, items):
    """Tests marked `full` are skipped unless pytest runs with --full."""
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="a `full` test: run bin/test-full (pytest --full)")
    for item in items:
        if "full" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets' folder; tests that need it skip where it is missing."""
    if SHARED_DATA is None:
        pytest.skip("shared/data (the real datasets) is not beside this checkout")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from more threads; one avoids oversubscribing shared CPUs."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny model directory (fast to build)."""
    from rapid_async.tinymodel import init_model_dir

    return init_model_dir(tmp_path_factory.mktemp("random-model") / "model", seed=0)


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> Path:
    """A random tiny model whose tokenizer has a chat template."""
    from rapid_async.tinymodel import add_chat_template, init_model_dir

    return add_chat_template(init_model_dir(tmp_path_factory.mktemp("chat-model") / "model"))


@pytest.fixture(scope="session")
def warm_model_dir() -> Path:
    """The cached warm-started tiny model (built once, under .cache/)."""
    from rapid_async.tinymodel import ensure_warm_model

    return Path(ensure_warm_model())


def cli(*args: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start `python -m rapid_async.cli ARGS` as a child process, output to `log`."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                "RAPID_LEARNER_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "rapid_async.cli", *args], cwd=REPO,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=full_env)


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 120) -> dict:
    """Wait for the learner's endpoint file; fail early if the learner died."""
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before writing {path}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} not written in {timeout} s")
        time.sleep(0.1)
    return json.loads(path.read_text())


def stop(proc: subprocess.Popen) -> None:
    """End a child we started, by its pid."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def read_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
