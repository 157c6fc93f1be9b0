"""What a run measured, per role: the numbers behind `rapid-tune report` and the cost model.

Used by `rapid-tune` on the machine that holds a run directory (no process of
the run needs to be alive). It reads RUN_DIR/metrics.jsonl, RUN_DIR/config.toml
(written by the learner) and RUN_DIR/placement.json (written by `rapid-run`:
which device each child had) and turns the cumulative counters that the
learner and the actors record into per-operation costs over a *steady window*:
from the learner record at 20% of the run's steps (at least step 3) to the last
one, so that start-up (actors loading their engines while the learner waits)
does not count as a property of the setting.

Learner (per optimizer step, from `learner/*` counters):
    wait_s      waiting for data            learner/wait_s
    train_s     forward / backward / step   learner/busy_s
    publish_s   training loop blocked       learner/publish_s (with a publisher
                                            thread, encoding is `weights/encode_s`)
    eval_s      held-out evaluation         learner/eval_s
    checkpoint_s                            learner/checkpoint_s
    other_s     the rest of the wall time (records, bookkeeping)
Actors (per actor, from `actor/*` counters): generation seconds per group
(`actor/gen_s` / `actor/groups`), groups per generate call (`actor/chunks`),
apply seconds per weight update (`actor/update_s` / (`actor/deltas` +
`actor/snapshots`)), seconds blocked sending (`actor/send_wait_s`), busy and
idle time. The loss side: staleness histogram, `is/truncated_frac` and
`is/ess_per_group` (means over the window), groups dropped as stale.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rapid_async.metrics import read_metrics

WINDOW_START = 0.2
"""The steady window starts at this fraction of the run's optimizer steps."""


@dataclass
class ActorCosts:
    """One actor over the steady window (seconds are totals in the window)."""

    actor_id: str
    window_s: float
    groups: float
    chunks: float
    gen_s: float
    apply_s: float
    applies: float
    send_wait_s: float
    busy_s: float
    idle_s: float
    eval_s: float = 0.0
    evals: float = 0.0

    @property
    def gen_per_group(self) -> float:
        return self.gen_s / self.groups if self.groups else float("nan")

    @property
    def groups_per_chunk(self) -> float:
        return self.groups / self.chunks if self.chunks else float("nan")

    @property
    def apply_per_update(self) -> float:
        return self.apply_s / self.applies if self.applies else float("nan")

    @property
    def busy_frac(self) -> float:
        total = self.busy_s + self.idle_s
        return self.busy_s / total if total else float("nan")


@dataclass
class RunCosts:
    """Per-role costs and outcomes of one run over its steady window."""

    run_dir: str
    config: Any
    placement: dict | None
    steps: int
    window_steps: int
    window_s: float
    learner: dict[str, float]
    publications: int
    actors: list[ActorCosts]
    staleness_hist: dict[int, int]
    truncated_frac: float
    ess_per_group: float
    generated: int
    dropped: int
    success: list[tuple[float, float]] = field(default_factory=list)
    """(training seconds, held-out success) of every evaluation."""
    reward: list[tuple[float, float]] = field(default_factory=list)
    """(training seconds, mean training reward) of every optimizer step."""
    encode_per_publication: float = 0.0
    """Mean `weights/encode_s`: encoding one version (publisher thread, if any)."""
    publisher_thread: bool = False
    """Whether a publisher thread encodes off the training loop (`weights/blocked_s`)."""
    superseded: int = 0
    """Versions the publisher skipped because a newer one was staged meanwhile."""
    evals: int = 0
    """Held-out evaluations by the learner inside the window."""
    is_points: list[tuple[float, float, float]] = field(default_factory=list)
    """(staleness/mean, is/truncated_frac, is/ess_per_group) of each step in the window."""
    mismatch_k3: float = float("nan")
    """Mean `mismatch/k3` over the window: KL(mu || pi) per token of staleness-0 groups
    (engine vs trainer at the same weights); nan when no step had such tokens."""
    mismatch_ratio_outside: float = float("nan")
    """Mean `mismatch/ratio_outside`: share of staleness-0 token ratios outside [0.5, 2]."""
    ratio_outside: float = float("nan")
    """Mean `is/ratio_outside`: share of all trained token ratios outside [0.5, 2]."""
    ess_min_group: float = float("nan")
    """Smallest `is/ess_min_group` of the window: the worst group's ESS / K."""

    @property
    def updates_per_s(self) -> float:
        """Optimizer steps per second of training time (evaluation excluded)."""
        active = self.window_s - self.learner["eval_s"] * self.window_steps
        return self.window_steps / active if active > 0 else float("nan")

    @property
    def span(self) -> int:
        """Optimizer steps per publication: sync_every, or H per round."""
        lc = self.config.learner
        if self.config.run.mode == "rapid-async":
            return max(1, lc.sync_every)
        return max(1, lc.batch_groups // lc.minibatch_groups)

    @property
    def publish_per_stage(self) -> float:
        """Seconds the training loop was blocked per version it handed over."""
        stages = self.window_steps / self.span
        return self.learner["publish_s"] * self.window_steps / stages if stages else 0.0

    @property
    def staleness_mean(self) -> float:
        n = sum(self.staleness_hist.values())
        return sum(s * c for s, c in self.staleness_hist.items()) / n if n else float("nan")

    @property
    def staleness_max(self) -> int:
        return max(self.staleness_hist, default=0)

    @property
    def drop_frac(self) -> float:
        return self.dropped / self.generated if self.generated else 0.0

    @property
    def gen_per_group(self) -> float:
        groups = sum(a.groups for a in self.actors)
        return sum(a.gen_s for a in self.actors) / groups if groups else float("nan")

    @property
    def groups_per_chunk(self) -> float:
        chunks = sum(a.chunks for a in self.actors)
        return sum(a.groups for a in self.actors) / chunks if chunks else float("nan")

    @property
    def apply_per_update(self) -> float:
        applies = sum(a.applies for a in self.actors)
        return sum(a.apply_s for a in self.actors) / applies if applies else float("nan")

    @property
    def actor_eval_per_eval(self) -> float:
        """Seconds an actor spent per held-out evaluation (0: none by actors)."""
        evals = sum(a.evals for a in self.actors)
        return sum(a.eval_s for a in self.actors) / evals if evals else 0.0

    def learner_fracs(self) -> dict[str, float]:
        """Share of the learner's wall time in each activity (sums to 1)."""
        total = sum(self.learner.values())
        return {k: v / total for k, v in self.learner.items()} if total else {}


def _step_records(recs: list[dict]) -> list[dict]:
    return [r for r in recs if r.get("role") == "learner" and "learner/busy_s" in r
            and isinstance(r.get("step"), int) and not r.get("event")]


def _num(rec: dict, key: str) -> float:
    v = rec.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


def _delta(a: dict, b: dict, key: str) -> float:
    return _num(b, key) - _num(a, key)


def _hist(rec: dict) -> dict[int, int]:
    h = rec.get("staleness/hist") or {}
    return {int(k): int(v) for k, v in h.items()} if isinstance(h, dict) else {}


def _window(steps: list[dict]) -> tuple[dict, dict]:
    i0 = min(max(2, int(len(steps) * WINDOW_START)), len(steps) - 2)
    return steps[max(i0, 0)], steps[-1]


def _actor_costs(recs: list[dict], t0: float) -> list[ActorCosts]:
    by_actor: dict[str, list[dict]] = {}
    for r in recs:
        if r.get("role") == "actor" and isinstance(r.get("actor_id"), str) \
                and "actor/groups" in r:
            by_actor.setdefault(r["actor_id"], []).append(r)
    out = []
    for actor_id, rs in sorted(by_actor.items()):
        # the last record at or before the window start, else the run's start
        before = [r for r in rs if r["time"] <= t0]
        a = before[-1] if before and before[-1] is not rs[-1] else {}
        b = rs[-1]
        window = b["time"] - (a["time"] if a else rs[0]["time"] - _num(rs[0], "elapsed_s"))
        out.append(ActorCosts(
            actor_id=actor_id, window_s=window, groups=_delta(a, b, "actor/groups"),
            chunks=_delta(a, b, "actor/chunks"), gen_s=_delta(a, b, "actor/gen_s"),
            apply_s=_delta(a, b, "actor/update_s"),
            applies=_delta(a, b, "actor/deltas") + _delta(a, b, "actor/snapshots"),
            send_wait_s=_delta(a, b, "actor/send_wait_s"), busy_s=_delta(a, b, "actor/busy_s"),
            idle_s=_delta(a, b, "actor/idle_s"), eval_s=_delta(a, b, "actor/eval_s"),
            evals=_delta(a, b, "actor/evals")))
    return out


def _read_config(run_dir: Path) -> Any:
    from rapid_async.config import load_config

    path = run_dir / "config.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the learner writes it at start-up")
    return load_config(path)


def _read_placement(run_dir: Path) -> dict | None:
    path = run_dir / "placement.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _evals(recs: list[dict], steps: list[dict]) -> list[tuple[float, float]]:
    """(training seconds, held-out success) for every evaluation of the run. An
    evaluation of policy version v (`eval/version`, else the record's step) is
    dated at the training time when version v was reached."""
    t_of_step = {r["step"]: _num(r, "train_s") for r in steps}
    out = []
    for r in recs:
        if r.get("role") != "learner" or not isinstance(r.get("eval/success"), (int, float)):
            continue
        v = r.get("eval/version", r.get("step", 0))
        if isinstance(r.get("eval/train_s"), (int, float)):  # evaluated by an actor
            t = float(r["eval/train_s"])
        else:
            t = 0.0 if not v else t_of_step.get(v, _num(r, "train_s") or None)
        if t is None:  # the end record: the last step's time
            t = max(t_of_step.values(), default=0.0)
        out.append((t, float(r["eval/success"])))
    return sorted(out, key=lambda p: p[0])


def measure_run(run_dir: str | Path) -> RunCosts:
    """Per-role costs of the run in `run_dir` (see the module docstring).

    Raises:
        ValueError: when the run has too few optimizer steps to measure.
        FileNotFoundError: when RUN_DIR/metrics.jsonl or config.toml is missing.
    """
    run_dir = Path(run_dir)
    recs = read_metrics(run_dir)
    steps = _step_records(recs)
    if len(steps) < 4:
        raise ValueError(f"{run_dir}: {len(steps)} optimizer steps recorded; at least 4 are "
                         "needed to measure a run (train longer)")
    a, b = _window(steps)
    n = b["step"] - a["step"]
    window_s = b["time"] - a["time"]
    per = {k: _delta(a, b, f"learner/{k}") / n for k in
           ("wait_s", "busy_s", "publish_s", "eval_s", "checkpoint_s")}
    learner = {"wait_s": per["wait_s"], "train_s": per["busy_s"], "publish_s": per["publish_s"],
               "eval_s": per["eval_s"], "checkpoint_s": per["checkpoint_s"]}
    learner["other_s"] = max(0.0, window_s / n - sum(learner.values()))
    published = _delta(a, b, "net/weights/published")
    cfg = _read_config(run_dir)
    if not published:
        published = n // max(cfg.learner.sync_every, 1)
    inside = [r for r in steps if a["step"] < r["step"] <= b["step"]]
    ha, hb = _hist(a), _hist(b)
    hist = {s: hb.get(s, 0) - ha.get(s, 0) for s in hb if hb.get(s, 0) - ha.get(s, 0) > 0}
    return RunCosts(
        run_dir=str(run_dir), config=cfg, placement=_read_placement(run_dir),
        steps=steps[-1]["step"], window_steps=n, window_s=window_s, learner=learner,
        publications=int(published), actors=_actor_costs(recs, a["time"]),
        staleness_hist=dict(sorted(hist.items())),
        truncated_frac=_mean(inside, "is/truncated_frac"),
        ess_per_group=_mean(inside, "is/ess_per_group"),
        generated=int(_delta(a, b, "buffer/accepted")), dropped=int(_delta(a, b, "buffer/dropped_stale")),
        success=_evals(recs, steps),
        evals=sum(1 for r in inside if isinstance(r.get("eval/success"), (int, float))),
        encode_per_publication=_mean(inside, "weights/encode_s"),
        publisher_thread=any("weights/blocked_s" in r for r in inside),
        superseded=int(_delta(a, b, "weights/superseded")),
        is_points=[(r["staleness/mean"], r["is/truncated_frac"], r["is/ess_per_group"])
                   for r in inside if all(isinstance(r.get(k), (int, float)) for k in
                                          ("staleness/mean", "is/truncated_frac",
                                           "is/ess_per_group"))],
        reward=[(_num(r, "train_s"), r["reward/mean"]) for r in steps
                if isinstance(r.get("reward/mean"), (int, float))],
        mismatch_k3=_mean(inside, "mismatch/k3"),
        mismatch_ratio_outside=_mean(inside, "mismatch/ratio_outside"),
        ratio_outside=_mean(inside, "is/ratio_outside"),
        ess_min_group=min((r["is/ess_min_group"] for r in inside
                           if isinstance(r.get("is/ess_min_group"), (int, float))),
                          default=float("nan")))


def _mean(recs: list[dict], key: str) -> float:
    vals = [r[key] for r in recs if isinstance(r.get(key), (int, float))]
    return statistics.fmean(vals) if vals else float("nan")
