"""`rapid-replay RUN_DIR`: retrain a run offline from its replay record and check every version.

Reads RUN_DIR/config.toml and RUN_DIR/replay/ (written by the learner when
`learner.record_replay` is on; `rapid_async.learner.replay_record`), rebuilds
the starting model and optimizer exactly as the learner did (`Trainer` from the
run's config, seed and model directory, torch threads as recorded), then feeds
it the recorded mini-batches in order, one `Trainer.step` each, and after each
step compares the version and the digest of every weight tensor with the
record. On a CPU the replay is bit-exact: every digest must match. The first
mismatch stops the replay and is reported with its version, step and the first
differing tensor (in `state_dict` order).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rapid_async.learner.replay_record import (decode_batch, read_meta, read_step, step_files,
                                               weight_digests)


@dataclass
class ReplayResult:
    """What a replay found."""

    steps: int = 0
    """Step records replayed."""
    versions: list[int] = field(default_factory=list)
    """Versions checked, in order (the start version first)."""
    mismatch: str | None = None
    """None when every check passed, else what differed first."""
    version: int | None = None
    """The first version that differs (None when all match)."""
    tensor: str | None = None
    """The first tensor that differs at that version."""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.mismatch is None


def first_difference(got: dict[str, int], want: dict[str, int]) -> tuple[str, int] | None:
    """(name, how many differ) of the first tensor whose digest differs, in `want`'s order."""
    names = [n for n in want if got.get(n) != want[n]] + [n for n in got if n not in want]
    return (names[0], len(names)) if names else None


def replay_run(run_dir: str | Path, progress=None) -> ReplayResult:
    """Replay RUN_DIR (module docstring); `progress(text)` is called per version."""
    from rapid_async.config import load_config
    from rapid_async.learner.trainer import Trainer

    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    meta = read_meta(run_dir)
    if meta.get("start_version", 0) != 0:
        raise ValueError(f"{run_dir}: the replay record starts at version {meta['start_version']} "
                         "(a resumed run); replay needs the record from version 0")
    cfg = load_config(run_dir / "config.toml", overrides=["learner.record_replay=off",
                                                          "learner.record_batches=false",
                                                          "learner.device=cpu"])
    if cfg.run.seed != meta.get("seed"):
        raise ValueError(f"{run_dir}: config.toml has run.seed = {cfg.run.seed} but the record "
                         f"was made with seed {meta.get('seed')}")
    model_dir = Path(meta["model_dir"])
    if not model_dir.is_dir():
        raise FileNotFoundError(f"the run's model directory {model_dir} is gone: replay starts "
                                "from the same weights")
    threads = meta.get("torch_threads")
    if threads:
        torch.set_num_threads(int(threads))
    trainer = Trainer(cfg, model_dir)
    result = ReplayResult()
    say = progress or (lambda text: None)
    try:
        if not _check(result, weight_digests(trainer.model), meta["start_digests"], 0, 0):
            return _done(result, t0)
        result.versions.append(0)
        for path in step_files(run_dir):
            rec = read_step(path)
            if rec["version_before"] != trainer.version:
                result.mismatch = (f"step {rec['index']}: recorded at version {rec['version_before']}, "
                                   f"the replay is at version {trainer.version}")
                result.version = trainer.version
                break
            trainer.step(decode_batch(rec["batch"]))
            result.steps += 1
            if trainer.version != rec["version_after"]:
                result.mismatch = (f"step {rec['index']}: the run reached version "
                                   f"{rec['version_after']}, the replay {trainer.version} "
                                   "(a step skipped in one and not the other)")
                result.version = rec["version_after"]
                break
            if not _check(result, weight_digests(trainer.model), rec["digests"],
                          trainer.version, rec["index"]):
                break
            result.versions.append(trainer.version)
            say(f"version {trainer.version} (step {rec['index']}): {len(rec['digests'])} tensors match")
    finally:
        trainer.close()
    return _done(result, t0)


def _check(result: ReplayResult, got: dict[str, int], want: dict[str, int], version: int,
           index: int) -> bool:
    diff = first_difference(got, want)
    if diff is None:
        return True
    name, count = diff
    where = "the start weights" if index == 0 else f"version {version} (step {index})"
    result.version, result.tensor = version, name
    result.mismatch = (f"{where} differ from the run's: tensor {name} first "
                       f"(digest {got.get(name)} != recorded {want.get(name)}), "
                       f"{count} tensor(s) differ in all")
    return False


def _done(result: ReplayResult, t0: float) -> ReplayResult:
    result.seconds = time.perf_counter() - t0
    return result
