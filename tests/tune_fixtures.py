"""Helpers for the tune tests: recorded runs unpacked into run directories."""

from __future__ import annotations

import gzip
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tune"


@lru_cache(maxsize=None)
def fixture_run(name: str) -> Path:
    """A run directory holding the recorded run `name` (metrics.jsonl unpacked)."""
    src = FIXTURES / name
    if not (src / "metrics.jsonl.gz").is_file():
        raise FileNotFoundError(f"{src}: no recorded run (tests/fixtures/tune/record.py)")
    out = Path(tempfile.mkdtemp(prefix=f"tune-{name}-"))
    with gzip.open(src / "metrics.jsonl.gz", "rb") as f, open(out / "metrics.jsonl", "wb") as g:
        shutil.copyfileobj(f, g)
    for extra in ("config.toml", "placement.json"):
        if (src / extra).is_file():
            shutil.copy(src / extra, out / extra)
    return out
