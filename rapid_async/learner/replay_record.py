"""The replay record of a run: every trained mini-batch and the weights' digests per version.

Used by the learner process (`Trainer`, when `learner.record_replay` is on) to
write, and by `rapid-replay` (`rapid_async.replay`) to read. Layout of
RUN_DIR/replay/:

    meta.json                  seed, model directory, torch threads and version,
                               the start version and its weight digests
    step-NNNNNNNN.msgpack.zst  one per `Trainer.update`, in order (N = 1, 2, ...):
                               the collated mini-batch exactly as trained (token
                               ids, attention / completion masks, positions,
                               behaviour log-probs, rewards, policy versions,
                               truncation flags; every tensor field of `Batch`),
                               the version before and after, whether the step was
                               taken, and the digest of every weight tensor after

Each step file is one msgpack map compressed by zstd; tensors are raw
little-endian buffers with dtype and shape (no pickle anywhere). Files are
written to a temporary name and renamed, so a reader never sees half a file.
Digests are `weights.digest` linear digests of the float32 master weights
(per tensor, in `state_dict` order): equal digests mean equal bits (up to the
64-bit checksum's collisions), and a difference names the tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch
import zstandard

from rapid_async.learner.policy import Batch
from rapid_async.weights.digest import as_list, state_digests
from rapid_async.weights.layout import Layout

REPLAY_DIR = "replay"
FORMAT = 1
"""Bumped when the record layout changes."""
_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.int64: "int64",
           torch.int32: "int32", torch.bool: "bool", torch.float16: "float16"}
_TORCH = {name: dtype for dtype, name in _DTYPES.items()}


def weight_digests(model: torch.nn.Module) -> dict[str, int]:
    """Linear digest of every floating-point tensor of `model.state_dict()` (its own dtype)."""
    state = {k: v.detach() for k, v in model.state_dict().items() if v.is_floating_point()}
    out: dict[str, int] = {}
    for dtype in sorted({str(v.dtype).removeprefix("torch.") for v in state.values()}):
        named = {k: v for k, v in state.items() if str(v.dtype).removeprefix("torch.") == dtype}
        layout = Layout.from_named(named.items(), dtype)
        flat = layout.allocate()
        for name, view in layout.views(flat).items():
            view.copy_(named[name].to(flat.device).reshape(view.shape))
        out.update(zip(layout.names, as_list(state_digests(flat, layout))))
    return {k: out[k] for k in state}


def encode_tensor(t: torch.Tensor) -> dict[str, Any]:
    t = t.detach().cpu().contiguous()
    if t.dtype not in _DTYPES:
        raise ValueError(f"cannot record a tensor of dtype {t.dtype}")
    return {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data": t.numpy().tobytes()}


def decode_tensor(d: dict[str, Any]) -> torch.Tensor:
    dtype = _TORCH.get(d.get("dtype"))
    if dtype is None:
        raise ValueError(f"unknown tensor dtype {d.get('dtype')!r} in a replay record")
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    return torch.from_numpy(np.frombuffer(d["data"], dtype=np_dtype).copy()).reshape(d["shape"])


def encode_batch(batch: Batch) -> dict[str, Any]:
    """Every field of a Batch: tensors as raw buffers, other values as they are."""
    return {k: (encode_tensor(v) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.__dict__.items() if v is not None}


def decode_batch(d: dict[str, Any]) -> Batch:
    return Batch(**{k: (decode_tensor(v) if isinstance(v, dict) else v) for k, v in d.items()})


def step_path(run_dir: str | Path, index: int) -> Path:
    return Path(run_dir) / REPLAY_DIR / f"step-{index:08d}.msgpack.zst"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class ReplayRecorder:
    """Writes a run's replay record (module docstring); one per learner.

    Args:
        run_dir: the run directory.
        meta: seed, model directory and the like, written to meta.json with
            the start version and its digests.
        model: the trainer's model (for the digests).
        version: the version training starts from.
    """

    def __init__(self, run_dir: str | Path, meta: dict[str, Any], model: torch.nn.Module,
                 version: int):
        self.root = Path(run_dir) / REPLAY_DIR
        self.root.mkdir(parents=True, exist_ok=True)
        for old in step_files(self.root.parent):  # a fresh run in a used directory
            old.unlink()
        self.model = model
        self.index = 0
        self.bytes = 0
        self.compressor = zstandard.ZstdCompressor(level=3)
        info = {"format": FORMAT, **meta, "start_version": version,
                "start_digests": weight_digests(model)}
        _write_atomic(self.root / "meta.json", json.dumps(info, indent=1).encode())

    def record(self, batch: Batch, version_before: int, version_after: int, stepped: bool) -> int:
        """Write one step's record; returns its compressed size in bytes."""
        self.index += 1
        rec = {"index": self.index, "version_before": version_before,
               "version_after": version_after, "stepped": stepped,
               "batch": encode_batch(batch), "digests": weight_digests(self.model)}
        data = self.compressor.compress(msgpack.packb(rec, use_bin_type=True))
        _write_atomic(step_path(self.root.parent, self.index), data)
        self.bytes += len(data)
        return len(data)


def read_meta(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / REPLAY_DIR / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run has no replay record "
                                "(learner.record_replay was off?)")
    return json.loads(path.read_text())


def read_step(path: Path) -> dict[str, Any]:
    """One step record (raises ValueError naming the file when it cannot be read)."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(path.read_bytes())
        rec = msgpack.unpackb(raw, raw=False)
    except (zstandard.ZstdError, ValueError, msgpack.ExtraData) as exc:
        raise ValueError(f"{path}: not a replay record ({exc})") from exc
    if not isinstance(rec, dict) or "batch" not in rec or "digests" not in rec:
        raise ValueError(f"{path}: not a replay record (fields missing)")
    return rec


def write_step(path: Path, rec: dict[str, Any]) -> None:
    """Rewrite a step record (tests perturb records this way)."""
    _write_atomic(path, zstandard.ZstdCompressor(level=3).compress(msgpack.packb(rec, use_bin_type=True)))


def step_files(run_dir: str | Path) -> list[Path]:
    return sorted((Path(run_dir) / REPLAY_DIR).glob("step-*.msgpack.zst"))
