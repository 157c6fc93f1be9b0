"""SIGINT / SIGTERM in the learner process: stop after the current step.

Used by the learner process: `StopOnSignal` is a mixin of the `Learner`
(`rapid_async.learner.loop`), which sets `stop_requested` to None and
`_previous_handlers` to {} before the handlers are installed. The handler only
records the request; the training loop acts on it (finishes the step, then
shuts down cleanly: checkpoint, end record, actors stopped, exit 0). A second
signal interrupts at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger("rapid.learner")

STOP_MARGIN_S = 600.0
"""A graceful stop's allowance for the current step, the shut-down checkpoint
and the last publish (each bounded by the machine and the model, not by config)."""


def stop_grace_s(cfg: Any) -> float:
    """How long a graceful stop of the learner may take, at most: the margin
    above, noticing that an actor died (`learner.actor_timeout_s`) and the wait
    for the final evaluation (`run.eval_timeout_s`). rapid-run waits this long
    for the learner, and torchrun (`--shutdown-timeout`) for its ranks."""
    return STOP_MARGIN_S + cfg.learner.actor_timeout_s + cfg.run.eval_timeout_s


class StopOnSignal:
    """Signal handlers that ask the loop to stop (a mixin of `Learner`)."""

    stop_requested: str | None
    _previous_handlers: dict[int, Any]

    def _install_signal_handlers(self) -> None:
        """SIGINT / SIGTERM: finish the current step, then shut down cleanly
        (checkpoint, end record, actors stopped, exit 0). A second signal
        interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.stop_requested:
            raise KeyboardInterrupt(f"second {name}")
        self.stop_requested = f"signal {name}"
        log.warning("%s: stopping after the current step (checkpoint, end record); "
                    "send it again to stop at once", name)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

