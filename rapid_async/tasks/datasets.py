"""Dataset loading and the train / held-out plumbing shared by the dataset tasks.

Used by the gsm8k, math, mbpp and minif2f tasks (in every process that builds
a task: learner, actors, evaluation). Records come from

- a local JSONL file (optionally gzipped), one JSON object per line, or
- a Hugging Face dataset (`hf_dataset = "openai/gsm8k"`, `hf_config`,
  `hf_split`), where the optional `datasets` package is installed and the
  network reaches the hub (both are checked, with a clear error).

`DatasetTask` turns two lists of problems into the task interface: training
problem `index` walks the training list in a seeded random order, a new
order each epoch (so an index is a pure function of the options), and the
held-out list is fixed and disjoint from training.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path
from typing import Any

from rapid_async.tasks.base import Problem

DATA_ENV = "RAPID_DATA"
"""Environment variable naming the data root (default ./data): a task's
default files are DATA_ROOT/<task>/<file>, the layout of shared/data."""


def data_root() -> Path:
    """`$RAPID_DATA`, else ./data."""
    return Path(os.environ.get(DATA_ENV, "data"))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a JSONL (or .jsonl.gz) file.

    Raises:
        ValueError: the file is missing (the message says how to point at it)
            or a line is not a JSON object (the message names the line).
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data file {p} does not exist; set the task option that names it "
                         f"(e.g. [task.options] train_path) or ${DATA_ENV}")
    opener = gzip.open if p.suffix == ".gz" else open
    records = []
    with opener(p, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{p}:{number}: not valid JSON ({err})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{p}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    if not records:
        raise ValueError(f"data file {p} holds no records")
    return records


def read_hf(name: str, split: str, config: str | None = None) -> list[dict[str, Any]]:
    """Every record of a Hugging Face dataset split (needs `datasets` and the network)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"hf_dataset = {name!r} needs the optional package `datasets` "
                         "(pip install datasets); or give a local JSONL path") from None
    try:
        return [dict(r) for r in datasets.load_dataset(name, config, split=split)]
    except Exception as err:  # offline, unknown name, bad split: say which
        raise ValueError(f"could not load Hugging Face dataset {name!r} (config {config!r}, "
                         f"split {split!r}): {type(err).__name__}: {err}") from err


def load_records(path: str | None, default: Path, hf_dataset: str | None = None,
                 hf_split: str = "train", hf_config: str | None = None) -> list[dict[str, Any]]:
    """Records from `hf_dataset` when given, else from `path` (or `default`)."""
    if hf_dataset:
        return read_hf(hf_dataset, hf_split, hf_config)
    return read_jsonl(path or default)


def require_fields(records: list[dict], fields: tuple[str, ...], source: str) -> None:
    """ValueError naming the first record that lacks one of `fields`."""
    for i, record in enumerate(records):
        missing = [f for f in fields if f not in record]
        if missing:
            raise ValueError(f"{source}: record {i} has no field(s) {missing}; "
                             f"this task needs {list(fields)}")


class DatasetTask:
    """Task interface over fixed lists of training and held-out problems.

    Subclasses set `name` and call `_set_problems` in their constructor.

    Args:
        seed: seeds the order of training problems (reshuffled each epoch).
    """

    name = "dataset"

    def __init__(self, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        self._train: list[Problem] = []
        self._heldout: list[Problem] = []
        self._orders: dict[int, list[int]] = {}

    def _set_problems(self, train: list[Problem], heldout: list[Problem]) -> None:
        if not train:
            raise ValueError(f"task {self.name}: no training problems")
        overlap = {p.prompt for p in heldout} & {p.prompt for p in train}
        if overlap:
            train = [p for p in train if p.prompt not in overlap]
        self._train, self._heldout = train, heldout

    @property
    def train_size(self) -> int:
        return len(self._train)

    @property
    def heldout_size(self) -> int:
        return len(self._heldout)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self._train)))
            random.Random(f"{self.name}-{self.seed}-{epoch}").shuffle(order)
            self._orders = {epoch: order}  # keep one epoch: indices mostly move forward
        return self._orders[epoch]

    def train_problem(self, index: int) -> Problem:
        """Training problem number `index` (>= 0): a seeded shuffle per epoch."""
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"index must be a non-negative integer, got {index!r}")
        epoch, position = divmod(index, len(self._train))
        return self._train[self._order(epoch)[position]]

    def heldout(self, n: int) -> list[Problem]:
        """The first `n` held-out problems (0 <= n <= heldout_size)."""
        if not 0 <= n <= len(self._heldout):
            raise ValueError(f"n must be in 0..{len(self._heldout)} (the held-out set of "
                             f"task {self.name}), got {n}")
        return list(self._heldout[:n])
