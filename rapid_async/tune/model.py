"""The cost model of `rapid-tune`: measured per-role costs in, predicted behaviour out.

Used by `rapid-tune report` (what would move the bottleneck) and `rapid-tune
recommend` (which setting to run), in the rapid-tune process only.

What it predicts. For a `Setting` (mode, actors per learner, max_staleness,
batch_groups / minibatch_groups, sync_every, buffer_groups, chunk_groups, and
the split of the node's devices between the learner and the actors) it
predicts optimizer updates per second, the learner's time split (waiting for
data / training / publishing / other), the actors' busy fraction, the
staleness distribution of consumed groups, the fraction of generated groups
dropped as stale, and the truncated-weight fraction and effective sample size
of the loss.

The costs (`Costs`), all seconds at the full speed of one device:

    train(G)  = train_fixed + train_per_group * G   one optimizer step on G groups
    publish(k) = publish + publish_growth * (k - 1) training loop blocked per publication
                                                     of a delta spanning k steps (k =
                                                     sync_every, or H per round)
    publish_bg                                       publisher-thread work per publication
                                                     (on the learner's device; a newer
                                                     version supersedes a waiting one)
    other                                            per step: records, bookkeeping
    gen(n)    = gen_fixed + gen_per_group * n        one generate call of n groups
    apply(k)  = apply + apply_growth * (k - 1)       an actor applying one such update
    actor_eval                                       an actor evaluating one version (every
                                                     run.eval_every published versions)
    speed-up of a learner on M devices = 1 + (M - 1) * learner_scaling

How. Closed forms give the throughput bound, 1 / (train + publish / sync_every
+ other) steps/s for the learner and N / gen-per-group / G for the actors, but
not what happens between: grants that shrink to the room the buffer has left,
groups dropped for staleness, actors waiting for weights, the learner and an
actor sharing a core. So the model *runs* the schedule in simulated time
(`rapid_async.tune.sim`): the learner's real `RolloutBuffer` and
`WorkScheduler` hand out and take groups exactly as in a run, the learner and
each actor are processes that do the work above, and processes placed on the
same device (by the launcher's rule, `plan_devices`: the learner on the
first M devices, actors on the next cores or on the other GPUs) share it
equally. Statistics come from a steady window (after the first 20% of
`updates` steps), as `measure` reads real runs.

Calibration (`calibrate`) turns measured runs into costs: each run's
per-operation times are de-rated for the sharing the simulation says its
placement caused (three fixed-point passes), then train() and gen() are fitted
as lines over the runs' mini-batch and chunk sizes (proportional when the runs
have one size only). The truncated-weight fraction grows with staleness (each
version moves the policy by about one learning-rate step, whatever the batch):
`truncated = truncated_per_version * mean staleness`, and likewise
`1 - ESS = ess_loss_per_version * mean staleness`, fitted by least squares
through the origin over the runs' step records.

What it leaves out: engine batching beyond a line, memory-bandwidth contention
between cores, the learner's network thread, start-up, and the learning rate's
effect on anything but the truncation slope. `tests/test_tune_model.py` checks
it against recorded runs (tests/fixtures/tune/).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rapid_async.tune.roles import System
from rapid_async.tune.sim import Simulation


@dataclass(frozen=True)
class Setting:
    """The knobs the model varies (config fields, plus actors and devices)."""

    mode: str = "rapid-async"
    actors: int = 1
    batch_groups: int = 32
    minibatch_groups: int = 32
    max_staleness: int = 4
    buffer_groups: int = 96
    sync_every: int = 1
    chunk_groups: int = 32
    devices: int = 2
    learner_devices: int = 1
    eval_every: int = 0
    kind: str = "cpu"

    @classmethod
    def from_config(cls, cfg: Any, actors: int, devices: int, kind: str = "cpu",
                    eval_every: int = 0) -> "Setting":
        lc = cfg.learner
        return cls(mode=cfg.run.mode, actors=actors, batch_groups=lc.batch_groups,
                   minibatch_groups=lc.minibatch_groups, max_staleness=lc.max_staleness,
                   buffer_groups=lc.buffer_groups, sync_every=lc.sync_every,
                   chunk_groups=cfg.actor.chunk_groups, devices=devices,
                   learner_devices=getattr(lc, "devices", 1), eval_every=eval_every, kind=kind)

    @classmethod
    def from_run(cls, run: Any) -> "Setting":
        """The setting a measured run (`measure.RunCosts`) ran with."""
        placement = run.placement or {}
        devices = int(placement.get("devices") or len(run.actors) + 1)
        # Evaluations by the learner are left out (train_s excludes them); those
        # by actors take actor time and stay in.
        evals_on_actors = any(a.evals for a in run.actors)
        return cls.from_config(run.config, actors=max(1, len(run.actors)), devices=devices,
                               kind=placement.get("kind", "cpu"),
                               eval_every=run.config.run.eval_every if evals_on_actors else 0)

    def overrides(self) -> list[str]:
        """The config lines (`--set` values) of this setting."""
        return [f"run.mode={self.mode}", f"learner.batch_groups={self.batch_groups}",
                f"learner.minibatch_groups={self.minibatch_groups}",
                f"learner.max_staleness={self.max_staleness}",
                f"learner.buffer_groups={self.buffer_groups}",
                f"learner.sync_every={self.sync_every}",
                f"actor.chunk_groups={self.chunk_groups}",
                f"learner.devices={self.learner_devices}"]

    def label(self) -> str:
        return (f"{self.mode} N={self.actors} mb={self.minibatch_groups} "
                f"batch={self.batch_groups} stale<={self.max_staleness} "
                f"buf={self.buffer_groups} sync={self.sync_every} chunk={self.chunk_groups}"
                + (f" learner_devices={self.learner_devices}" if self.learner_devices > 1 else ""))


def plan_devices(actors: int, devices: int, learner_devices: int = 1,
                 kind: str = "cpu") -> dict[str, tuple[str, ...]]:
    """Device of each process, as the launcher assigns them (`launch.device_plan`):
    the learner on the first `learner_devices`; on CPU actor i on core
    (learner_devices + i) mod cores, on GPUs actor i on the other GPUs in turn
    (all on the learner's first GPU when it has them all)."""
    devices = max(1, devices)
    m = max(1, min(learner_devices, devices))
    out: dict[str, tuple[str, ...]] = {"learner": tuple(str(d) for d in range(m))}
    others = [str(d) for d in range(m, devices)] or ["0"]
    for i in range(actors):
        out[f"actor-{i}"] = (str((m + i) % devices),) if kind == "cpu" \
            else (others[i % len(others)],)
    return out


@dataclass
class Costs:
    """Per-operation costs at the full speed of one device (see the module docstring)."""

    train_per_group: float
    gen_per_group: float
    publish: float = 0.0
    apply: float = 0.0
    train_fixed: float = 0.0
    gen_fixed: float = 0.0
    publish_bg: float = 0.0
    other: float = 0.0
    eval: float = 0.0
    actor_eval: float = 0.0
    publish_growth: float = 0.0
    apply_growth: float = 0.0
    learner_scaling: float = 0.85
    truncated_per_version: float = 0.0
    ess_loss_per_version: float = 0.0

    def train(self, groups: int) -> float:
        return self.train_fixed + self.train_per_group * groups

    def gen(self, groups: int) -> float:
        return self.gen_fixed + self.gen_per_group * groups

    def publish_cost(self, versions: int) -> float:
        """Blocking publish of an update that spans `versions` optimizer steps."""
        return self.publish + self.publish_growth * (versions - 1)

    def apply_cost(self, versions: int) -> float:
        """An actor applying an update that spans `versions` optimizer steps."""
        return self.apply + self.apply_growth * (versions - 1)


@dataclass
class Prediction:
    """What the model expects of a setting (fractions of wall time)."""

    setting: Setting
    updates_per_s: float
    learner: dict[str, float]
    actor_busy: float
    actor: dict[str, float]
    staleness_hist: dict[int, int]
    drop_frac: float
    groups_per_s: float
    truncated_frac: float
    ess_per_group: float
    op_seconds: dict[str, float] = field(default_factory=dict)
    chunk_mean: float = 0.0
    """Groups per generate call (grants shrink to the room left in the buffer)."""

    @property
    def staleness_mean(self) -> float:
        n = sum(self.staleness_hist.values())
        return sum(s * c for s, c in self.staleness_hist.items()) / n if n else 0.0

    @property
    def bottleneck(self) -> str:
        """"actors" when the learner waits for data 15% of the time or more, else "learner"."""
        return "actors" if self.learner.get("wait", 0.0) >= 0.15 else "learner"


def predict(costs: Costs, setting: Setting, updates: int = 0) -> Prediction:
    """Simulate `setting` with `costs` for `updates` optimizer steps (0: enough for a
    steady state) and return the steady-window statistics."""
    s = setting
    h = max(1, s.batch_groups // s.minibatch_groups)
    updates = updates or max(80, 6 * h, 3 * (s.max_staleness + 1) * s.sync_every)
    start = max(h, updates // 5)
    system = System(costs, s)
    sim = Simulation()
    system.sim = sim
    mark: dict[str, Any] = {}

    def on_update() -> None:
        if len(system.update_times) == start:
            mark.update(snap=sim.snapshot(), stale=Counter(system.stale), t0=sim.now,
                        n0=start, dropped=system.buffer.dropped_stale,
                        generated=system.generated)

    system.on_update = on_update
    places = plan_devices(s.actors, s.devices, s.learner_devices, s.kind)
    sim.add("learner", system.learner(), places["learner"])
    if costs.publish_bg > 0:
        sim.add("publisher", system.publisher(), places["learner"])
    for i in range(s.actors):
        sim.add(f"actor-{i}", system.actor(f"actor-{i}"), places[f"actor-{i}"])
    per_step = costs.train(s.minibatch_groups) + costs.publish_cost(s.sync_every) \
        + costs.publish_bg + costs.other + costs.gen(s.minibatch_groups) \
        + costs.apply_cost(s.sync_every) + 1e-3
    stall = per_step * (s.batch_groups // s.minibatch_groups + s.max_staleness + 2) * 20 + 1.0

    def stop() -> bool:  # enough steps, or none for a long time (e.g. every group stale)
        last = system.update_times[-1] if system.update_times else 0.0
        return len(system.update_times) >= updates or sim.now - last > stall

    sim.run(stop=stop, t_max=per_step * updates * 4 * (s.actors + 2) + 10.0)
    return _summarise(system, sim, mark, s)


def _fractions(now: dict[str, float], then: dict[str, float]) -> dict[str, float]:
    delta = {k: now.get(k, 0.0) - then.get(k, 0.0) for k in now}
    total = sum(delta.values())
    return {k: v / total for k, v in delta.items()} if total > 0 else {}


def _summarise(system: System, sim: Simulation, mark: dict, s: Setting) -> Prediction:
    c = system.c
    if "snap" not in mark or len(system.update_times) <= mark["n0"]:
        # never reached a steady window: starved (e.g. every group dropped) or stuck
        return Prediction(s, 0.0, {"wait": 1.0}, 0.0, {}, {}, 1.0 if system.generated else 0.0,
                          0.0, float("nan"), float("nan"))
    window = system.update_times[-1] - mark["t0"]
    n = len(system.update_times) - mark["n0"]
    snap = mark["snap"]
    procs = {p.name: p for p in sim.procs}
    learner = _fractions(procs["learner"].time, snap["learner"][0])
    actor_fr = [_fractions(procs[f"actor-{i}"].time, snap[f"actor-{i}"][0]) for i in range(s.actors)]
    actor = {k: sum(a.get(k, 0.0) for a in actor_fr) / len(actor_fr)
             for k in {k for a in actor_fr for k in a}}
    stale = system.stale - mark["stale"]
    generated = system.generated - mark["generated"]
    dropped = system.buffer.dropped_stale - mark["dropped"]
    pred = Prediction(
        setting=s, updates_per_s=n / window if window > 0 else 0.0, learner=learner,
        actor_busy=actor.get("gen", 0.0) + actor.get("apply", 0.0), actor=actor,
        staleness_hist=dict(sorted(stale.items())),
        drop_frac=dropped / generated if generated else 0.0,
        groups_per_s=generated / window if window > 0 else 0.0,
        truncated_frac=0.0, ess_per_group=1.0, op_seconds=_op_seconds(procs, snap))
    gen_calls = sum(procs[f"actor-{i}"].count["gen"] - snap[f"actor-{i}"][1].get("gen", 0)
                    for i in range(s.actors))
    gen_time = sum(procs[f"actor-{i}"].time.get("gen", 0.0) - snap[f"actor-{i}"][0].get("gen", 0.0)
                   for i in range(s.actors))
    if generated:
        pred.op_seconds["actor/gen_group"] = gen_time / generated
        pred.chunk_mean = generated / max(gen_calls, 1)
    pred.truncated_frac = min(1.0, c.truncated_per_version * pred.staleness_mean)
    pred.ess_per_group = max(0.0, 1.0 - c.ess_loss_per_version * pred.staleness_mean)
    return pred


def _op_seconds(procs: dict, snap: dict) -> dict[str, float]:
    """Wall seconds per operation in the window, per role ("learner/train", "actor/gen")."""
    time: Counter = Counter()
    count: Counter = Counter()
    for name, p in procs.items():
        role = name.split("-")[0]
        then_t, then_c = snap[name]
        for kind, k in p.count.items():
            if kind in ("idle", "wait", "wait_version"):
                continue
            count[f"{role}/{kind}"] += k - then_c.get(kind, 0)
            time[f"{role}/{kind}"] += p.time.get(kind, 0.0) - then_t.get(kind, 0.0)
    return {k: time[k] / count[k] for k in count if count[k] > 0}
