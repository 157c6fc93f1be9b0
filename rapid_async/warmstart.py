"""The tiny model's warm start: supervised training until a held-out target, cached.

Trains the tiny model (`rapid_async.tinymodel`) with teacher forcing on the
`SloppyTeacher`'s demonstrations of 2-digit "+-" arithmetic. Floating point
differs between CPUs (vector widths, BLAS kernels, thread counts), so a fixed
number of steps gave held-out success anywhere from 0.05 to 0.25 depending on
the machine; instead training stops at the first check (every 50 steps) whose
greedy held-out success reaches the recipe's target, within a step bound, so
the quality lands in a narrow band on any machine and the number of steps is
what varies. `warm_start.json` beside the weights records the recipe, the
steps taken, every check, and the CPU.

Used by: the launcher and `bin/quickstart` (through `ensure_warm_model`, which
caches the model by a hash of task, seed, recipe and size), and tests.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from rapid_async.supervised import (TEACHER_PERIOD_RATE, SloppyTeacher,  # noqa: F401
                                    train_supervised)
from rapid_async.tinymodel import (DEFAULT_SIZE, build_model, build_tokenizer, save_model_dir,
                                   settings_hash)

WARM_START_DEFAULTS = {"steps": 4000, "batch_size": 128, "lr": 3e-3, "decay_steps": 1500,
                       "target": 0.15, "check_every": 50, "check_n": 500}
"""The warm-start recipe: AdamW at lr, cosine-decayed to 10% over decay_steps
and constant after; every check_every steps the greedy success on check_n
held-out problems is measured, and training stops at the first check at or
above target (None: never), or after `steps` steps at most. The number of
steps thus adapts to the machine's floating point, and the quality does not."""
WARM_START_VERSION = 4
"""Bumped whenever the warm-start recipe changes, so cached models are rebuilt."""


def warm_start(out_dir: str | Path, task=None, seed: int = 0, threads: int = 2,
               eval_n: int = 200, log=print, recipe: dict | None = None, **size: int) -> Path:
    """Build the tiny model, train it on the task until a held-out target, and save it.

    Deterministic by seed on one machine (for a fixed thread count): the
    initialisation, the data order (train problems 0, 1, 2, ...) and the
    optimizer are all seeded. Across machines the floating point differs, so
    the weights do, and so would the quality after a fixed number of steps;
    stopping at a held-out target (`WARM_START_DEFAULTS`) keeps the quality in
    a narrow band instead. Writes `warm_start.json` next to the weights: the
    recipe, the steps taken, every check's success, whether the target was
    reached, and the greedy success on the first `eval_n` held-out problems
    (what the quickstart reports before RL).

    Args:
        out_dir: destination directory (replaced atomically).
        task: an arithmetic-style task; default `ArithmeticTask()` (2 digits, "+-").
        seed: seed of initialisation and training.
        threads: torch CPU threads while training (restored afterwards).
        eval_n: held-out problems for the final greedy evaluation (0 skips it).
        log: callable for progress lines (None for silence).
        recipe: overrides of `WARM_START_DEFAULTS` (steps, batch_size, lr, ...).
        **size: overrides of `DEFAULT_SIZE`.

    Returns:
        The saved model directory.
    """
    from rapid_async.engines.hf import HFEngine
    from rapid_async.evaluate import evaluate
    from rapid_async.tasks.arithmetic import ArithmeticTask

    task = task if task is not None else ArithmeticTask()
    recipe = _recipe(recipe)
    say = log if log is not None else (lambda *_: None)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    checks: list[list] = []
    budget = _answer_budget(task)
    try:
        start = time.monotonic()
        model = build_model(seed=seed, **size)
        tokenizer = build_tokenizer()
        torch.manual_seed(seed)

        def progress(step: int, loss: float) -> None:
            say(f"step {step}/{recipe['steps']}  loss {loss:.4f}  "
                f"elapsed {time.monotonic() - start:.1f}s")

        def check(step: int) -> bool:
            success = evaluate(HFEngine.from_model(model), tokenizer, task,
                               n=min(recipe["check_n"], task.heldout_size), max_new_tokens=budget)
            checks.append([step, success])
            say(f"step {step}: held-out greedy success {success:.3f} (target {recipe['target']})")
            return success >= recipe["target"]

        say(f"warm start: up to {recipe['steps']} steps x {recipe['batch_size']} problems of"
            f" {task.name} until held-out greedy success >= {recipe['target']}, lr {recipe['lr']},"
            f" seed {seed}, {threads} thread(s)")
        losses = train_supervised(
            model, tokenizer, SloppyTeacher(task), recipe["steps"], recipe["batch_size"],
            recipe["lr"], log=progress, log_every=max(1, min(100, recipe["steps"] // 10)),
            decay_steps=recipe["decay_steps"],
            check=check if recipe["target"] is not None else None,
            check_every=recipe["check_every"])
        train_seconds = time.monotonic() - start
        success = None
        if eval_n:
            success = evaluate(HFEngine.from_model(model), tokenizer, task, n=eval_n,
                               max_new_tokens=budget)
            say(f"held-out greedy success {success:.3f} on {eval_n} problems "
                f"after {len(losses)} steps")
    finally:
        torch.set_num_threads(previous_threads)
    reached = recipe["target"] is not None and bool(checks) and checks[-1][1] >= recipe["target"]
    if recipe["target"] is not None and not reached:
        say(f"warning: the warm start did not reach held-out success {recipe['target']} in "
            f"{recipe['steps']} steps; the model is kept as it is")
    out = save_model_dir(model, out_dir)
    report = {"settings": _settings(task, seed, recipe, size), "steps_taken": len(losses),
              "target_reached": reached, "checks": checks, "final_loss": losses[-1],
              "train_seconds": round(train_seconds, 1), "threads": threads,
              "cpu": _cpu_description(), "heldout_greedy_success": success, "heldout_n": eval_n}
    (out / "warm_start.json").write_text(json.dumps(report, indent=2))
    return out


def _recipe(overrides: dict | None) -> dict:
    """The warm-start recipe with defaults filled in, validated."""
    unknown = set(overrides or {}) - set(WARM_START_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown warm-start setting(s) {sorted(unknown)}; "
                         f"known: {sorted(WARM_START_DEFAULTS)}")
    recipe = {**WARM_START_DEFAULTS, **{k: v for k, v in (overrides or {}).items()
                                        if v is not None or k == "target"}}
    positive = ("steps", "batch_size", "decay_steps", "check_every", "check_n")
    if any(not isinstance(recipe[k], int) or recipe[k] < 1 for k in positive) \
            or not recipe["lr"] > 0:
        raise ValueError(f"{', '.join(positive)} must be positive integers and lr positive, "
                         f"got {recipe}")
    if recipe["target"] is not None and not 0.0 < recipe["target"] <= 1.0:
        raise ValueError(f"target must be in (0, 1] or None, got {recipe['target']}")
    return recipe


def _cpu_description() -> str:
    """The CPU and the vector instructions torch uses on it, for the report."""
    import platform

    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}; torch {torch.backends.cpu.get_cpu_capability()}"


def _answer_budget(task) -> int:
    """Tokens a completion may need: the longest possible answer plus EOS."""
    digits = getattr(task, "digits", 4)
    ops = getattr(task, "ops", "*")
    return (2 * digits if "*" in ops else digits + 1) + 2


def _settings(task, seed: int, recipe: dict, size: dict) -> dict:
    """Everything that determines a warm-started model (the recipe included),
    for the cache key."""
    options = task.options() if hasattr(task, "options") else {}
    return {"version": WARM_START_VERSION, "task": task.name, "task_options": options,
            "seed": seed, **recipe, "size": {**DEFAULT_SIZE, **size}}


def default_cache_dir() -> Path:
    """`$RAPID_CACHE`, else `.cache/rapid_async/` in the repository root."""
    env = os.environ.get("RAPID_CACHE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / ".cache" / "rapid_async"


SHIPPED_DIR = Path(__file__).resolve().parent / "assets"
"""Warm-started models that ship with the package (the default recipe's, built
once with `python -m rapid_async.tinymodel ship-warm`): a fresh clone uses it
on any CPU instead of training for minutes, and every machine starts from the
same weights."""


def ensure_warm_model(cache_dir: str | Path | None = None, task=None, seed: int = 0,
                      log=print, threads: int = 2, eval_n: int = 200,
                      recipe: dict | None = None, **size: int) -> Path:
    """Return the warm-started model for these settings: the cached one, else the
    one shipped in `SHIPPED_DIR`, else a new build (into the cache).

    The directory name carries a hash of every setting (task options, seed,
    the recipe with its target, model size, recipe version); a build writes
    to a temporary directory and renames it into place, so readers never see
    a partial model.

    Args:
        cache_dir: cache root; default `default_cache_dir()`.
        task: as in `warm_start`; default `ArithmeticTask()`.
        seed: as in `warm_start`.
        log: progress callable, used only when building.
        threads, eval_n, recipe, **size: as in `warm_start`.

    Returns:
        The model directory.
    """
    from rapid_async.tasks.arithmetic import ArithmeticTask

    task = task if task is not None else ArithmeticTask()
    recipe = _recipe(recipe)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = settings_hash(_settings(task, seed, recipe, size))
    target = root / f"warm-{task.name}-{key}"
    for found in (target, SHIPPED_DIR / target.name):
        if (found / "model.safetensors").exists() and (found / "warm_start.json").exists():
            return found
    return warm_start(target, task=task, seed=seed, log=log, threads=threads, eval_n=eval_n,
                      recipe=recipe, **size)
