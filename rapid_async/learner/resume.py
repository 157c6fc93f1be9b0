"""The work state a checkpoint records, and resuming a run from a checkpoint.

Used by the learner process (`rapid_async.learner.loop`): `work_state` is what
each checkpoint records besides the weights (the prompts granted but not yet
trained and the next new prompt index); `resume_from_checkpoint` loads the newest checkpoint
of a run into the trainer and says which prompts to hand out again. Writing
and loading checkpoints themselves is `learner/checkpoint.py`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rapid_async.config import Config

log = logging.getLogger("rapid.learner")


def work_state(net: Any, scheduler: Any, buffer: Any, taken: list[Any]) -> tuple[list[int], int]:
    """(prompts granted but not yet trained, the next new prompt index).

    Pending prompts are at actors, in the buffer, or taken (`taken`) and not
    yet trained. Both are read on the network thread (`net.call`), which hands
    out work and moves groups from "at an actor" to "in the buffer", so
    together they account for every prompt: on resume the pending ones are
    handed out again and new ones start at the index, none skipped, none twice."""
    def held() -> tuple[int, list[str]]:
        return scheduler.next_index, [*map(str, scheduler.pending()), *buffer.prompt_ids()]

    next_index, ids = net.call(held)
    ids += [g.prompt_id for g in taken]
    return sorted({int(i) for i in ids if str(i).isdigit()}), next_index


def resume_from_checkpoint(trainer: Any, cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Load the newest checkpoint in `run_dir` into `trainer`; hyper-parameters
    come from the config (logged, and returned under "changes", where they
    differ from the checkpoint's). Returns path, version, pending prompts and
    changes."""
    from rapid_async.learner import checkpoint

    checkpoint.recover(run_dir)  # a rewrite killed between its renames
    ckpt = checkpoint.latest_checkpoint(run_dir)
    if ckpt is None:
        raise ValueError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    meta = checkpoint.load(trainer, ckpt)
    changes = checkpoint.config_changes(meta.get("config", {}), cfg.to_dict())
    changes.update(checkpoint.apply_hyperparameters(trainer.optimizer, cfg))
    log.info("resumed from %s at version %d; %d prompt(s) granted but not trained are "
             "handed out again", ckpt, trainer.version, len(meta["pending"]))
    for name, (old, new) in sorted(changes.items()):
        log.info("resume: %s = %r from the config (the checkpoint had %r)", name, new, old)
    return {"path": str(ckpt), "version": trainer.version, "pending": meta["pending"],
            "changes": changes}
