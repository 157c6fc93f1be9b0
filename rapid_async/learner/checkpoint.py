"""Learner checkpoints: periodic, written in the background, rotated, atomic.

Used by the learner process (`rapid_async.learner.loop`). A checkpoint is
RUN_DIR/checkpoints/step-NNNNNNNN, a Hugging Face model directory (config,
safetensors weights, tokenizer) plus

    trainer_state.pt        optimizer state and RNG states (CPU, CUDA, Python)
    adapter/                `learner.lora`: the peft adapter, loaded on resume (the
                            weights are the merged ones; learner/lora.py)
    rapid_checkpoint.json   version, data position, the prompts that were
                            granted but not yet trained (handed out again on
                            resume), the run config, and `extra` (stop reason)

Writing stalls training only for a copy: `capture` copies model, optimizer and
RNG state on the training thread between two updates (device tensors into
reusable pinned host buffers), and a background thread writes that copy to
`.tmp-step-N-PID` and renames it into place, so a crash never leaves a
half-written checkpoint. Rewriting a version that already has a checkpoint
(the shut-down one after a periodic one) never deletes the only complete
copy: the old one is renamed to `.old-step-N-PID`, the new one renamed in,
and only then the old one deleted; `recover` (at start and before resuming)
puts a leftover `.old-` back where no `step-N` is and removes the rest. Only
the newest `keep` checkpoints are kept.
`Checkpointer.due` says when: every `checkpoint_every` steps and every
`checkpoint_minutes` minutes; `Checkpointer.save` returns the seconds the
training loop was blocked, which the learner reports as `learner/checkpoint_s`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("rapid.learner")

PREFIX = "step-"
MARKER = "rapid_checkpoint.json"
STATE_FILE = "trainer_state.pt"


@dataclass
class Snapshot:
    """A consistent host-memory copy of the learner's state at one version."""

    version: int
    data_position: int
    pending: list[int]
    model_state: dict[str, torch.Tensor]
    trainer_state: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    adapter_state: dict[str, torch.Tensor] | None = None  # LoRA: the adapters (peft's keys)
    adapter_model: Any = None  # LoRA: the peft model (its adapter config)
    base_dir: str = ""  # LoRA: the base model directory


# ---------------------------------------------------------------- copies


class HostBuffers:
    """Reusable pinned host memory for device tensors (pinning is slow to allocate).

    A buffer is reused by the next capture, so a capture may only start once
    the previous snapshot has been written (`Checkpointer` ensures it).
    """

    def __init__(self) -> None:
        self._buffers: dict[Any, torch.Tensor] = {}

    def copy(self, key: Any, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if tensor.device.type == "cpu":
            return tensor.clone()
        buf = self._buffers.get(key)
        if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
            buf = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._buffers[key] = buf
        buf.copy_(tensor, non_blocking=True)
        return buf


def _copy_tree(obj: Any, buffers: HostBuffers, key: tuple, seen: dict) -> Any:
    """Copy every tensor of a nested dict / list to host memory (shared storage stays shared)."""
    if isinstance(obj, torch.Tensor):
        ident = (obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape),
                 tuple(obj.stride()), obj.dtype) if obj.numel() else None
        if ident is not None and ident in seen:
            return seen[ident]  # tied weights: one copy, still tied in the file
        out = buffers.copy(key, obj)
        if ident is not None:
            seen[ident] = out
        return out
    if isinstance(obj, dict):
        return {k: _copy_tree(v, buffers, key + (k,), seen) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_tree(v, buffers, key + (i,), seen) for i, v in enumerate(obj))
    return obj


def rng_state() -> dict[str, Any]:
    """The RNG states that affect training: torch CPU, every CUDA device, Python."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()` output (CUDA only where the device count matches)."""
    torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is not None:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("checkpoint has the RNG state of %d CUDA device(s), this process sees %d: "
                        "CUDA sampling will not repeat exactly", len(cuda),
                        torch.cuda.device_count() if torch.cuda.is_available() else 0)


def capture(trainer: Any, pending: list[int], meta: dict[str, Any] | None = None,
            buffers: HostBuffers | None = None) -> Snapshot:
    """Copy the trainer's state to host memory; call between two updates."""
    buffers = buffers or HostBuffers()
    seen: dict = {}
    model_state, optimizer_state = trainer.checkpoint_state()  # several ranks: gathered on rank 0
    if not (getattr(trainer, "lora", False) and trainer.device.type == "cpu"):
        # (LoRA on CPU: the merged tensors are new and the rest frozen; no copy needed)
        model_state = _copy_tree(model_state, buffers, ("model",), seen)
    optimizer = _copy_tree(optimizer_state, buffers, ("optimizer",), seen)
    adapters = getattr(trainer, "adapter_state", lambda: None)()
    if adapters is not None:
        adapters = _copy_tree(adapters, buffers, ("adapter",), {})
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # the non-blocking copies have landed
    return Snapshot(version=trainer.version, data_position=trainer.data_position,
                    pending=sorted(int(i) for i in pending), model_state=model_state,
                    trainer_state={"optimizer": optimizer, "rng": rng_state()},
                    meta=dict(meta or {}), adapter_state=adapters,
                    adapter_model=trainer.model if adapters is not None else None,
                    base_dir=str(getattr(trainer, "model_dir", "")))


# ---------------------------------------------------------------- files


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def write(snapshot: Snapshot, run_dir: str | Path, model: Any, tokenizer: Any) -> Path:
    """Write a snapshot to RUN_DIR/checkpoints/step-N atomically; return its path.

    `model` supplies the config (`save_pretrained` with the snapshot's
    weights); nothing of it is read that training changes.
    """
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{snapshot.version:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=dict(snapshot.model_state))
    tokenizer.save_pretrained(tmp)
    if snapshot.adapter_state is not None:
        from rapid_async.learner.lora import ADAPTER_DIR, save_adapter

        save_adapter(tmp / ADAPTER_DIR, snapshot.adapter_state, snapshot.adapter_model,
                     str(Path(snapshot.base_dir).resolve()) if snapshot.base_dir else "")
    torch.save(snapshot.trainer_state, tmp / STATE_FILE)
    (tmp / MARKER).write_text(json.dumps({  # written last: it marks a complete checkpoint
        "version": snapshot.version, "data_position": snapshot.data_position,
        "pending": snapshot.pending, **snapshot.meta}))
    _swap_in(tmp, final)
    return final


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` to `final`; an existing `final` is set aside
    first and deleted last, so a complete copy exists at every moment."""
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)  # atomic: step-N is now absent, `old` complete
    os.replace(tmp, final)  # atomic: step-N is the new, complete checkpoint
    _sync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _sync_dir(path: Path) -> None:
    """Make the renames in `path` durable (where the OS allows a directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def recover(run_dir: str | Path) -> list[str]:
    """Repair what a writer killed mid-way left: a set-aside `.old-step-N-*`
    goes back to step-N when no complete step-N exists (the kill fell between
    the two renames), every other `.old-` and `.tmp-` directory is deleted.
    Call only while no writer runs in `run_dir`. Returns what it did."""
    root = checkpoint_root(run_dir)
    done: list[str] = []
    if not root.is_dir():
        return done
    for old in sorted(root.glob(".old-*")):
        name = old.name[len(".old-"):].rsplit("-", 1)[0]  # step-NNNNNNNN
        final = root / name
        if (old / MARKER).is_file() and not (final / MARKER).is_file() and name.startswith(PREFIX):
            shutil.rmtree(final, ignore_errors=True)
            os.replace(old, final)
            done.append(f"restored {name} from {old.name}")
            log.warning("checkpoint %s restored from %s (a rewrite of it was interrupted)",
                        name, old.name)
        else:
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"removed {old.name}")
    for tmp in root.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
        done.append(f"removed {tmp.name}")
    return done


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.name.startswith(PREFIX) and (p / MARKER).is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    done = list_checkpoints(run_dir)
    return done[-1] if done else None


def rotate(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints; return the deleted."""
    done = list_checkpoints(run_dir)
    old = done[:-keep] if keep > 0 else []
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def remove_temporary(run_dir: str | Path) -> None:
    """Clean up after a learner that was killed while writing (`recover`)."""
    recover(run_dir)


def read_meta(path: str | Path) -> dict[str, Any]:
    """rapid_checkpoint.json of a checkpoint (older ones lack `pending`: empty)."""
    meta = json.loads((Path(path) / MARKER).read_text())
    meta.setdefault("pending", [])
    return meta


def load(trainer: Any, path: str | Path) -> dict[str, Any]:
    """Restore weights, optimizer, RNG, version and data position; return the metadata."""
    from transformers import AutoModelForCausalLM

    if trainer.ranks.world > 1:
        raise ValueError("--resume with learner.devices > 1 is not supported yet: resume on one "
                         "rank (learner.devices = 1), or start from the checkpoint's model "
                         "directory with model.path")
    from rapid_async.learner import lora

    path = Path(path)
    if getattr(trainer, "lora", False):  # the base stays as loaded; the adapters come back
        lora.load_adapter(trainer.model, path / lora.ADAPTER_DIR, trainer.cfg.learner)
    else:
        lora.refuse_adapters(path)
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=trainer.model.dtype)
        trainer.model.load_state_dict(loaded.state_dict())
    state = torch.load(path / STATE_FILE, weights_only=True)
    if any(isinstance(k, str) for k in state["optimizer"].get("state", {})):
        raise ValueError(f"{path} was written by several learner ranks (optimizer state keyed by "
                         "parameter name); resuming it is not supported yet: start a new run "
                         f"from its weights with model.path = {str(path)!r}")
    trainer.optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"] if "rng" in state else {"torch": state["torch_rng"]})
    meta = read_meta(path)
    trainer.version = int(meta["version"])
    trainer.data_position = int(meta["data_position"])
    meta.setdefault("extra", state.get("extra", {}))
    return meta


# ---------------------------------------------------------------- hyper-parameters


OPTIMIZER_FIELDS = {"lr": "learner.lr", "weight_decay": "learner.weight_decay"}


def apply_hyperparameters(optimizer: Any, cfg: Any) -> dict[str, list]:
    """Set the optimizer's lr and weight decay from the config (a resumed
    optimizer state carries the checkpoint's); return {field: [old, new]}
    for those that changed."""
    changed: dict[str, list] = {}
    for group in optimizer.param_groups:
        for key, dotted in OPTIMIZER_FIELDS.items():
            new = float(cfg._get(dotted))
            if group.get(key) != new:
                changed[dotted] = [group.get(key), new]
                group[key] = new
    return changed


def config_changes(old: dict[str, dict], new: dict[str, dict]) -> dict[str, list]:
    """{"section.key": [checkpoint value, config value]} for every field that differs."""
    out = {}
    for section, values in new.items():
        for key, value in values.items():
            before = old.get(section, {}).get(key, value)
            if before != value:
                out[f"{section}.{key}"] = [before, value]
    return out


# ---------------------------------------------------------------- the writer


class Checkpointer:
    """When to checkpoint, and the background thread that writes.

    Args:
        run_dir: the run directory.
        every_steps: a checkpoint every N optimizer steps (0: off).
        every_minutes: a checkpoint every M minutes (0: off).
        keep: how many complete checkpoints to keep (the newest).
        start_version: the version training starts from (0, or the resumed one).
    """

    def __init__(self, run_dir: str | Path, every_steps: int, every_minutes: float, keep: int,
                 start_version: int = 0):
        self.run_dir = Path(run_dir)
        self.every_steps = every_steps
        self.every_minutes = every_minutes
        self.keep = keep
        self.last_version = start_version
        self.last_time = time.monotonic()
        self.buffers = HostBuffers()
        self.stats = {"checkpoint/saved": 0, "checkpoint/write_s": 0.0, "checkpoint/version": -1}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        remove_temporary(self.run_dir)

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def due(self, version: int) -> bool:
        """True when a periodic checkpoint is due at `version` (and the writer is free)."""
        if version == self.last_version or self.busy():
            return False
        steps = self.every_steps and version // self.every_steps > self.last_version // self.every_steps
        minutes = self.every_minutes and time.monotonic() - self.last_time >= self.every_minutes * 60
        return bool(steps or minutes)

    def check(self) -> None:
        """Re-raise a failure of the background writer in the training loop."""
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint failed: {error!r}") from error

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def save(self, trainer: Any, pending: list[int], meta: dict[str, Any] | None = None,
             background: bool = True) -> float:
        """Checkpoint the trainer now; return the seconds the caller was blocked.

        With `background` the write happens in a thread after the copy; without
        it (shutdown) the call returns once the checkpoint is on disk.
        """
        t0 = time.perf_counter()
        self.wait()
        self.check()
        snapshot = capture(trainer, pending, meta, self.buffers)
        self.last_version, self.last_time = snapshot.version, time.monotonic()
        args = (snapshot, getattr(trainer, "hf_model", trainer.model), trainer.tokenizer)
        if background:
            self._thread = threading.Thread(target=self._write, args=args,
                                            name="checkpoint-writer", daemon=True)
            self._thread.start()
        else:
            self._write(*args)
            self.check()
        return time.perf_counter() - t0

    def _write(self, snapshot: Snapshot, model: Any, tokenizer: Any) -> None:
        t0 = time.perf_counter()
        try:
            path = write(snapshot, self.run_dir, model, tokenizer)
            for old in rotate(self.run_dir, self.keep):
                log.info("removed old checkpoint %s", old.name)
        except BaseException as exc:  # re-raised by check() in the training loop
            self._error = exc
            return
        self.stats["checkpoint/saved"] += 1
        self.stats["checkpoint/write_s"] += time.perf_counter() - t0
        self.stats["checkpoint/version"] = snapshot.version
        log.info("checkpoint %s written in %.2fs", path, time.perf_counter() - t0)
