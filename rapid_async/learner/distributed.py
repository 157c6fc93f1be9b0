"""Several learner ranks on one node: torchrun, FSDP2, rank 0 leads.

Used by the learner process when it runs under torchrun (`learner.devices` > 1;
`rapid-run --learner-devices M` or `rapid-learner --devices M` start torchrun,
or start it yourself: `torchrun --nproc_per_node M -m rapid_async.cli learner
...`). Every rank holds a shard of the weights, gradients and AdamW state
(`fully_shard` on each decoder layer and on the whole policy). Rank 0 runs the
whole `Learner` (sockets, buffer, scheduler, publishing, checkpoints); ranks
1..M-1 run `follow`: they wait for a command from rank 0 and do their part of
it: train on their share of a mini-batch (whole groups), gather the full
weights for publishing (`PARAMS`, the weight publisher's `gather`), for an
evaluation (`GATHER`) or a checkpoint (`CHECKPOINT`, with the optimizer
state), or stop. These gathers are collectives: rank 0 makes them on its
training thread, between updates, never from another thread.

Commands travel over a separate gloo group with a long timeout. Followers wait
there for as long as rank 0 waits for rollouts or publishes, which would trip
the NCCL watchdog (10 minutes) on the training group; the training group only
sees the collectives of a step or a gather, which every rank reaches together.
On CPU everything runs on gloo, which is how the tests run two ranks.

Errors: an error every rank raises at the same point of a step, after its
collectives (`SameOnEveryRank`: `learner.max_skipped_steps` reached) leaves
the ranks in step; a follower logs it and keeps serving rank 0's commands,
so rank 0's shut-down (checkpoint, last publish, STOP) goes through. Any
other error in a follower ends that process at once with code 1 (torchrun
then stops the job); one in rank 0's step marks the ranks out of step
(`Ranks.broken`), and rank 0 then makes no more collectives (no checkpoint
from the ranks, no STOP) and exits, so that no rank waits for a collective
that never comes.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from dataclasses import dataclass, fields
from typing import Any

import torch

log = logging.getLogger("rapid.learner")

UPDATE, GATHER, CHECKPOINT, STOP, PARAMS = 1, 2, 3, 4, 5
"""Commands from rank 0 to the followers."""
CONTROL_TIMEOUT = datetime.timedelta(days=7)
"""How long a follower waits for the next command (rank 0 may wait on actors)."""
_DTYPES = [torch.int64, torch.int32, torch.float32, torch.float64, torch.bool]


@dataclass
class Ranks:
    """This process's place among the learner ranks (world 1: no distribution)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    control: Any = None
    """The gloo process group that carries commands and small CPU tensors."""
    broken: str = ""
    """Set on rank 0 when an error left the ranks out of step: no more collectives."""

    @property
    def leader(self) -> bool:
        return self.rank == 0


def init_ranks(device: str) -> tuple[Ranks, torch.device]:
    """Join the torchrun job named by the environment (WORLD_SIZE > 1), if any.

    Args:
        device: `learner.device`; "cuda" gives rank r the GPU `LOCAL_RANK`.

    Returns:
        The ranks and this rank's torch device.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), torch.device(device)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    ranks = Ranks(world, dist.get_rank(), local_rank, control)
    log.info("learner rank %d of %d on %s", ranks.rank, world, dev)
    return ranks, dev


def shard(policy: torch.nn.Module, model: torch.nn.Module, device: torch.device,
          world: int) -> None:
    """FSDP2: shard each decoder layer, then the policy wrapper (embedding, norm, lm_head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    layer_types = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class "
                         "(_no_split_modules): cannot shard it per layer")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(policy, mesh=mesh)


def all_sum_(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Sum a CPU tensor over the ranks, in place (the control group)."""
    if ranks.world > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, group=ranks.control)
    return tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class SameOnEveryRank(RuntimeError):
    """An error that every rank raises at the same point, after the step's
    collectives (so the ranks are still in step and can go on to shut down)."""


# ---------------------------------------------------------------- commands


def send_command(ranks: Ranks, command: int, batch: Any = None) -> None:
    """Rank 0: tell the followers what to do next (with the mini-batch for UPDATE)."""
    import torch.distributed as dist

    if ranks.broken:
        raise RuntimeError(f"the learner ranks are out of step ({ranks.broken}): "
                           "no more commands to the other ranks")

    tensors = _batch_tensors(batch) if batch is not None else {}
    header = torch.tensor([command, len(tensors), batch.group_size if batch is not None else 0])
    dist.broadcast(header, src=0, group=ranks.control)
    names = [f.name for f in fields(_batch_type())]
    for name, tensor in tensors.items():
        meta = torch.tensor([names.index(name), _DTYPES.index(tensor.dtype), *tensor.shape])
        dist.broadcast(torch.tensor([meta.numel()]), src=0, group=ranks.control)
        dist.broadcast(meta, src=0, group=ranks.control)
        dist.broadcast(tensor.contiguous(), src=0, group=ranks.control)


def receive_command(ranks: Ranks) -> tuple[int, Any]:
    """A follower: wait for rank 0's next command; returns (command, batch or None)."""
    import torch.distributed as dist

    header = torch.zeros(3, dtype=torch.long)
    dist.broadcast(header, src=0, group=ranks.control)
    command, n_tensors, group_size = header.tolist()
    names = [f.name for f in fields(_batch_type())]
    values: dict[str, Any] = {}
    for _ in range(n_tensors):
        size = torch.zeros(1, dtype=torch.long)
        dist.broadcast(size, src=0, group=ranks.control)
        meta = torch.zeros(int(size), dtype=torch.long)
        dist.broadcast(meta, src=0, group=ranks.control)
        name_index, dtype_index, *shape = meta.tolist()
        tensor = torch.empty(shape, dtype=_DTYPES[dtype_index])
        dist.broadcast(tensor, src=0, group=ranks.control)
        values[names[name_index]] = tensor
    if not n_tensors:
        return command, None
    return command, _batch_type()(**values, group_size=group_size)


def _batch_type() -> type:
    from rapid_async.learner.policy import Batch

    return Batch


def _batch_tensors(batch: Any) -> dict[str, torch.Tensor]:
    return {f.name: getattr(batch, f.name) for f in fields(batch)
            if isinstance(getattr(batch, f.name), torch.Tensor)}


def follow(trainer: Any) -> None:
    """A follower's loop: do rank 0's commands until STOP. An error that rank
    0 raises too (`SameOnEveryRank`) is logged and the loop goes on: rank 0
    shuts down next and needs this rank for its last gathers."""
    ranks = trainer.ranks
    while True:
        command, batch = receive_command(ranks)
        if command == STOP:
            log.info("learner rank %d: stop", ranks.rank)
            return
        try:
            _do(trainer, command, batch)
        except SameOnEveryRank as exc:
            log.error("learner rank %d: %s (rank 0 stops too; serving its last commands)",
                      ranks.rank, exc)


def _do(trainer: Any, command: int, batch: Any) -> None:
    if command == UPDATE:
        trainer.step(batch)
    elif command == GATHER:
        trainer.gather_inference_state()
    elif command == CHECKPOINT:
        trainer.gather_checkpoint_state()
    elif command == PARAMS:
        trainer.gather_params()
    else:
        raise RuntimeError(f"learner rank {trainer.ranks.rank}: unknown command {command}")


def close(ranks: Ranks) -> None:
    """Rank 0 stops the followers; every rank leaves the process group.
    Out of step (`ranks.broken`), rank 0 only leaves: its exit ends the job."""
    if ranks.world == 1:
        return
    import torch.distributed as dist

    if ranks.broken:
        log.error("learner rank %d: not stopping the other ranks (%s); torchrun ends them",
                  ranks.rank, ranks.broken)
        return
    if ranks.leader:
        send_command(ranks, STOP)
    dist.barrier(group=ranks.control)
    dist.destroy_process_group()


# ---------------------------------------------------------------- processes


def needs_torchrun(devices: int) -> bool:
    """True when `devices` > 1 learner ranks are asked for outside torchrun."""
    return devices > 1 and "WORLD_SIZE" not in os.environ


def torchrun_argv(devices: int, cli_args: list[str], shutdown_s: float) -> list[str]:
    """The torchrun command line of `exec_torchrun`. `shutdown_s` is how long
    torchrun lets the ranks stop after it forwards SIGINT / SIGTERM before it
    SIGKILLs them (its default, 30 s, cuts rank 0's checkpoint and final
    evaluation short): `signals.stop_grace_s` of the config."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={devices}", f"--shutdown-timeout={math.ceil(shutdown_s)}",
            "-m", "rapid_async.cli", "learner", *cli_args]


def exec_torchrun(devices: int, cli_args: list[str], shutdown_s: float = 930.0) -> None:
    """Replace this process by `torchrun --standalone --nproc-per-node devices`
    running `python -m rapid_async.cli learner CLI_ARGS` (same pid, so a
    launcher that started this process still stops the whole job)."""
    import sys

    argv = torchrun_argv(devices, cli_args, shutdown_s)
    log.info("starting %d learner ranks: %s", devices, " ".join(argv))
    os.execv(sys.executable, argv)


def is_follower() -> bool:
    """True in learner ranks 1..M-1 under torchrun."""
    return int(os.environ.get("RANK", "0")) > 0


def run_follower(cfg: Any, model_dir: str | None) -> None:
    """A follower rank's whole life: build its shard of the trainer, follow, leave.

    SIGINT and SIGTERM (torchrun forwards them to every rank) are ignored here:
    rank 0 stops gracefully and needs the followers for its last gathers; it
    sends STOP at the end, and torchrun kills a follower whose rank 0 died.
    A follower that fails on its own exits at once with code 1 (no barrier:
    rank 0 would never reach it), and torchrun stops the job. If rank 0 dies,
    a follower's pending gloo collective fails at once (the peer closed) and
    it exits 1; in an NCCL collective it waits for the NCCL watchdog.
    """
    import signal

    from rapid_async.learner.startup import resolve_model_dir

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    from rapid_async.learner.trainer import Trainer

    trainer = Trainer(cfg, model_dir or resolve_model_dir(cfg))
    try:
        follow(trainer)
    except BaseException:
        log.exception("learner rank %d failed; exiting so that torchrun stops the job",
                      trainer.ranks.rank)
        logging.shutdown()
        os._exit(1)
    trainer.close()
