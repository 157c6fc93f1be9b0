"""Progress display for `rapid-run` and `rapid-tune`, built on rich.

Used by the launcher process (`rapid_async.launch`) and by rapid-tune. On a
terminal it is a live rich progress bar (steps or seconds done of the run's
budget, elapsed time, and a status text: policy version, reward, held-out
success, tokens/s, staleness, busy fractions); in a log file or a pipe, where
a live bar would only add control characters, the same status is printed as
one plain line every few seconds. `log` prints a line above the bar.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn)


class ProgressDisplay:
    """A titled progress bar with a status text; plain lines when not on a terminal.

    Args:
        title: what is being tracked, e.g. "[rapid-run]" or "trial 2/6".
        total: the amount that completes it (steps, seconds, trials), None if unknown.
        every_s: seconds between plain lines when not on a terminal.
        console: a rich Console (default: standard output).
    """

    def __init__(self, title: str, total: float | None = None, every_s: float = 5.0,
                 console: Console | None = None):
        self.title = title
        self.total = total
        self.every_s = every_s
        self.console = console or Console(soft_wrap=True, highlight=False)
        self.live = self.console.is_terminal
        self._last_line: float | None = None
        self._progress: Progress | None = None
        if self.live:
            self._progress = Progress(
                SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
                console=self.console)
            self._task = self._progress.add_task(escape(title), total=total, status="")
            self._progress.start()

    def update(self, completed: float | None = None, status: str = "",
               title: str | None = None, total: float | None = None) -> None:
        """Show progress; on a non-terminal, print a line at most every `every_s` seconds."""
        if title is not None:
            self.title = title
        if total is not None:
            self.total = total
        if self._progress is not None:
            fields: dict[str, Any] = {"status": escape(status), "description": escape(self.title)}
            if completed is not None:
                fields["completed"] = completed
            if total is not None:
                fields["total"] = total
            self._progress.update(self._task, **fields)
            return
        now = time.monotonic()
        if self._last_line is None or now - self._last_line >= self.every_s:
            self._last_line = now
            done = "" if completed is None else (
                f"{completed:g}/{self.total:g} " if self.total else f"{completed:g} ")
            self.console.print(f"{self.title} {done}{status}".rstrip(), markup=False)

    def log(self, text: str) -> None:
        """Print a line (above the bar on a terminal)."""
        self.console.print(text, markup=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> "ProgressDisplay":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def run_status(rec: dict[str, Any], actors_busy: str = "-") -> str:
    """The status text of a run from its newest learner record."""
    def f(key: str, fmt: str) -> str:
        v = rec.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"

    heldout = f("eval/success", ".3f")
    if heldout != "-" and isinstance(rec.get("eval/version"), int):
        heldout += f"@v{rec['eval/version']}"  # the version it evaluated
    return (f"step {f('step', 'd')} v{f('version', 'd')} reward {f('reward/mean', '.3f')} "
            f"heldout {heldout} tok/s {f('throughput/tokens_per_s', '.0f')} "
            f"staleness {f('staleness/mean', '.2f')} learner busy {f('learner/busy_frac', '.0%')} "
            f"actors busy {actors_busy} t {f('train_s', '.0f')}s")
