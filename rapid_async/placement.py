"""Where each child of rapid-run runs: GPUs or CPU cores per process.

Used by the launcher (`rapid_async.launch`, which re-exports these names) and
by every child at start (`apply_affinity_from_env`). On a GPU node the learner
gets the first `learner.devices` GPUs (one torchrun rank each) and each actor
one of the others (CUDA_VISIBLE_DEVICES; `learner.gpus` / `actor.gpus`
override); on CPU the learner's ranks get the first cores and the actors the
others (CPU affinity, one torch thread each). `placement_record` is what
RUN_DIR/placement.json holds (read by rapid-tune).
"""

from __future__ import annotations

import os
import subprocess
from typing import Any


def device_plan(n_actors: int, learner_devices: int = 1, learner_gpus: str = "",
                actor_gpus: str = "") -> list[dict[str, str]]:
    """Environment per child: index 0 the learner (all its ranks), then the actors.

    GPU node: the learner gets `learner_gpus` (default: the first
    `learner_devices` GPUs), each actor one of `actor_gpus` (default: the
    other GPUs; with none left, actors share the learner's first GPU). CPU:
    the learner's ranks get the first `learner_devices` cores, the actors the
    next ones (wrapping around).
    """
    gpus = _gpu_count()
    if gpus >= 1:
        return _gpu_plan(n_actors, gpus, learner_devices, learner_gpus, actor_gpus)
    cores = sorted(os.sched_getaffinity(0))
    learner_cores = ",".join(str(cores[i % len(cores)]) for i in range(learner_devices))
    plans = [{"RAPID_CPU_AFFINITY": learner_cores, "CUDA_VISIBLE_DEVICES": "",
              "OMP_NUM_THREADS": "1", "RAPID_LEARNER_THREADS": "1", "RAPID_DEVICE": "cpu"}]
    for i in range(learner_devices, learner_devices + n_actors):
        core = cores[i % len(cores)]
        plans.append({"RAPID_CPU_AFFINITY": str(core), "CUDA_VISIBLE_DEVICES": "",
                      "OMP_NUM_THREADS": "1", "RAPID_LEARNER_THREADS": "1",
                      "RAPID_DEVICE": "cpu",
                      # vLLM's CPU worker binds its own OpenMP threads: keep
                      # them on this child's core, not on the learner's.
                      "VLLM_CPU_OMP_THREADS_BIND": str(core)})
    return plans


def _gpu_plan(n_actors: int, gpus: int, learner_devices: int, learner_gpus: str,
              actor_gpus: str) -> list[dict[str, str]]:
    mine = [int(g) for g in learner_gpus.split(",")] if learner_gpus else list(range(learner_devices))
    if len(mine) != learner_devices or max(mine) >= gpus:
        raise ValueError(f"learner.devices = {learner_devices} needs that many GPUs of the "
                         f"{gpus} on this node (learner.gpus = {learner_gpus!r}): lower "
                         "learner.devices or list the GPUs in learner.gpus")
    theirs = ([int(g) for g in actor_gpus.split(",")] if actor_gpus
              else [g for g in range(gpus) if g not in mine] or mine[:1])
    if max(theirs) >= gpus:
        raise ValueError(f"actor.gpus = {actor_gpus!r}: this node has GPUs 0..{gpus - 1}")
    plans = [{"CUDA_VISIBLE_DEVICES": ",".join(map(str, mine)), "RAPID_DEVICE": "cuda"}]
    for i in range(n_actors):
        plans.append({"CUDA_VISIBLE_DEVICES": str(theirs[i % len(theirs)]), "RAPID_DEVICE": "cuda"})
    return plans


def _gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def placement_record(plan: list[dict[str, str]]) -> dict[str, Any]:
    """Which device each child got (RUN_DIR/placement.json, read by rapid-tune):
    {"kind": "cpu"|"cuda", "devices": N on the node, "children": {name: device}}."""
    kind = plan[0].get("RAPID_DEVICE", "cpu") if plan else "cpu"
    key = "CUDA_VISIBLE_DEVICES" if kind == "cuda" else "RAPID_CPU_AFFINITY"
    names = ["learner"] + [f"actor-{i}" for i in range(len(plan) - 1)]
    devices = _gpu_count() if kind == "cuda" else len(os.sched_getaffinity(0))
    return {"kind": kind, "devices": devices,
            "children": {name: env.get(key, "") for name, env in zip(names, plan)}}


def apply_affinity_from_env() -> None:
    """Called first thing in a child: pin to the core(s) the launcher chose; a
    learner rank under torchrun (LOCAL_RANK) takes its own core of the list."""
    value = os.environ.get("RAPID_CPU_AFFINITY")
    if value:
        cores = [int(c) for c in value.split(",")]
        if "LOCAL_RANK" in os.environ:
            cores = [cores[int(os.environ["LOCAL_RANK"]) % len(cores)]]
        os.sched_setaffinity(0, set(cores))
