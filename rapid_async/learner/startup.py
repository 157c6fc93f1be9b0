"""What the learner process settles before its loop: model, threads, learner.json.

Used by the learner process (`rapid_async.learner.loop`), and by the launcher,
the CLI and distributed learner ranks for `resolve_model_dir`:
- the model directory of a run (a local directory, a Hugging Face hub name
  downloaded to the hub cache, or the cached tiny model);
- torch's thread count for a CPU learner pinned by the launcher;
- RUN_DIR/learner.json, where actors and the launcher find the learner's
  endpoints, and where a resumed learner finds the ports to bind again.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from rapid_async.config import Config


def resolve_model_dir(cfg: Config) -> str:
    """The model directory of a run: `model.path` (a local directory, or a Hugging
    Face hub name such as "Qwen/Qwen2.5-0.5B-Instruct", downloaded to the hub
    cache), or the cached tiny model."""
    if cfg.model.path:
        p = Path(cfg.model.path)
        if (p / "config.json").is_file():
            return str(p)
        if not p.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.model.path):
            return _download(cfg.model.path)
        raise ValueError(f"model.path = {cfg.model.path!r} is not a Hugging Face model "
                         "directory (no config.json) nor a hub name like 'org/model'")
    from rapid_async.tinymodel import ensure_warm_model

    return str(ensure_warm_model())


def _download(name: str) -> str:
    """A hub model's files in the local hub cache (fetched on first use)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                       "*.model", "*.jinja"])
    except Exception as err:  # offline, unknown name, no access: say which
        raise ValueError(f"model.path = {name!r}: could not download it from the Hugging Face "
                         f"hub ({type(err).__name__}: {err}); give a local model directory") from err


def set_learner_threads() -> None:
    """Torch threads follow the device: a CPU learner pinned by the launcher runs
    RAPID_LEARNER_THREADS threads; otherwise (GPU learners) torch's default stays."""
    threads = os.environ.get("RAPID_LEARNER_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def endpoint_file(run_dir: Path) -> Path:
    """RUN_DIR/learner.json: where actors and the launcher find the control
    endpoint (and a resumed learner the ports to bind again)."""
    return run_dir / "learner.json"


def write_endpoint_file(run_dir: Path, sockets: Any, learner_id: str) -> None:
    """Write RUN_DIR/learner.json: the learner's three endpoints, its pid and
    the id of this incarnation."""
    endpoint_file(run_dir).write_text(json.dumps(
        {"control": sockets.control_endpoint, "rollouts": sockets.rollout_endpoint,
         "weights": sockets.weights_endpoint, "pid": os.getpid(),
         "learner_id": learner_id}))


def previous_ports(run_dir: Path) -> dict[str, int] | None:
    """The ports of the learner that last ran in `run_dir` (from learner.json),
    so that a resumed learner binds them again and running actors, which
    reconnect by themselves, find it; None when there is no record."""
    try:
        info = json.loads(endpoint_file(run_dir).read_text())
        return {name: int(str(info[name]).rsplit(":", 1)[1])
                for name in ("control", "rollouts", "weights")}
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
