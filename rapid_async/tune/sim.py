"""Simulated time for the cost model: the learner and actors as processes sharing devices.

Used by `rapid_async.tune.model` (in the `rapid-tune` process only). Each role
is a Python generator that yields what it does next:

    yield Work(kind, seconds)     compute for `seconds` on a device of its own
    yield Wait(kind, predicate)   block until predicate() is true

`Simulation.run` advances time event by event. Processes that compute on the
same device share it equally (processor sharing: two busy processes on one core
or GPU each run at half speed), which is how the launcher's placement (actor i
on core (i + 1) mod cores, or on a GPU) turns into contention. Every process
accounts its simulated time per kind, so the model reads idle fractions and
per-operation wall times off the simulation exactly as `measure` reads them off
a real run.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Generator

EPS = 1e-12


@dataclass
class Work:
    """Compute for `seconds` at full speed of the process's devices."""

    kind: str
    seconds: float


@dataclass
class Wait:
    """Block (using no device) until `until()` is true."""

    kind: str
    until: Callable[[], bool]


@dataclass
class Process:
    """One simulated role: its generator, devices and time accounting."""

    name: str
    body: Generator[Any, None, None]
    devices: tuple[str, ...]
    speed: float = 1.0
    state: Any = None
    remaining: float = 0.0
    time: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    count: Counter = field(default_factory=Counter)


class Simulation:
    """Event loop over processes with processor sharing per device."""

    def __init__(self, seed: int = 0) -> None:
        self.now = 0.0
        self.procs: list[Process] = []
        self._rng = random.Random(seed)

    def add(self, name: str, body: Generator[Any, None, None], devices: tuple[str, ...],
            speed: float = 1.0) -> Process:
        proc = Process(name, body, devices, speed)
        self.procs.append(proc)
        self._next(proc)
        return proc

    def _next(self, proc: Process) -> None:
        """Resume `proc` until it asks for non-zero work or a wait."""
        while True:
            try:
                req = next(proc.body)
            except StopIteration:
                proc.state = None
                return
            if isinstance(req, Work):
                proc.count[req.kind] += 1
                if req.seconds <= 0:
                    continue
                proc.state, proc.remaining = req, req.seconds
                return
            if isinstance(req, Wait):
                if req.until():
                    continue
                proc.state = req
                return
            raise TypeError(f"process {proc.name} yielded {req!r}, not Work or Wait")

    def snapshot(self) -> dict[str, tuple[dict[str, float], Counter]]:
        """Copies of every process's time per kind and operation counts."""
        return {p.name: (dict(p.time), Counter(p.count)) for p in self.procs}

    def _wake(self) -> None:
        """Resume every waiting process whose condition holds, in a shuffled
        order (seeded), so that processes waiting for the same thing (actors
        asking for work) get it as by chance, as they do by polling in a real run."""
        woke = True
        while woke:
            woke = False
            order = list(self.procs)
            self._rng.shuffle(order)
            for p in order:
                if isinstance(p.state, Wait) and p.state.until():
                    self._next(p)
                    woke = True

    def run(self, stop: Callable[[], bool], t_max: float) -> None:
        """Advance until `stop()` is true, time reaches `t_max`, or nothing can move."""
        while self.now < t_max and not stop():
            self._wake()
            running = [p for p in self.procs if isinstance(p.state, Work)]
            if not running:
                return  # every process waits on something that cannot change
            load = Counter(d for p in running for d in p.devices)
            rates = {p.name: p.speed / max(load[d] for d in p.devices) for p in running}
            dt = min(p.remaining / rates[p.name] for p in running)
            dt = min(dt, t_max - self.now) if dt > 0 else 0.0
            self.now += dt
            for p in self.procs:
                if p.state is not None:
                    p.time[p.state.kind] += dt
            for p in running:
                p.remaining -= rates[p.name] * dt
                if p.remaining <= EPS * max(1.0, p.state.seconds):
                    self._next(p)
