"""Calibration of the cost model: measured runs in, `Costs` out (see `model`'s docstring).

Used by `rapid-tune report` and `rapid-tune recommend`, in the rapid-tune
process only. A run's per-operation times are what the operations took *with
that run's placement*: an actor that shared the learner's core made training
look slower. `standalone_costs` removes that by simulating the run's own
setting and scaling each cost by measured / simulated wall time per operation
until they agree; `calibrate` then fits train() and gen() as lines over the
runs' mini-batch and chunk sizes and the staleness slopes of the loss
diagnostics.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from rapid_async.tune.model import Costs, Setting, predict

PASSES = 3
"""Fixed-point passes that remove the sharing a run's placement caused."""


def _finite(x: float, default: float = 0.0) -> float:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else default


def observed(run: Any) -> dict[str, float]:
    """Wall seconds per operation in a measured run (`measure.RunCosts`)."""
    gen_group = _finite(run.gen_per_group)
    if not gen_group:
        raise ValueError(f"{run.run_dir}: no actor generation recorded (actor/gen_s)")
    eval_total = run.learner["eval_s"] * run.window_steps
    return {
        "learner/train": run.learner["train_s"],
        "learner/publish": run.publish_per_stage,
        "learner/other": run.learner["other_s"],
        "learner/eval": eval_total / run.evals if run.evals else 0.0,
        # a publisher thread encodes on the learner's device, off the training loop
        "publisher/encode": _finite(run.encode_per_publication) if run.publisher_thread else 0.0,
        "actor/gen_group": gen_group,
        "actor/apply": _finite(run.apply_per_update),
        "actor/eval": run.actor_eval_per_eval,
    }


def _costs_of(ops: dict[str, float], s: Setting) -> Costs:
    return Costs(train_per_group=ops["learner/train"] / s.minibatch_groups,
                 gen_per_group=ops["actor/gen_group"], publish=ops["learner/publish"],
                 apply=ops["actor/apply"], other=ops["learner/other"],
                 eval=ops["learner/eval"], publish_bg=ops["publisher/encode"],
                 actor_eval=ops["actor/eval"])


def standalone_costs(run: Any) -> tuple[Setting, dict[str, float]]:
    """The run's setting and its per-operation costs at full device speed."""
    s = Setting.from_run(run)
    raw = observed(run)
    est = dict(raw)
    for _ in range(PASSES):
        pred = predict(_costs_of(est, s), s)
        for key in raw:
            sim = pred.op_seconds.get(key, 0.0)
            if sim > 0 and est[key] > 0:
                est[key] *= raw[key] / sim
    # groups per generate call: as recorded (actor/chunks), else as the schedule gives them
    est["chunk"] = _finite(run.groups_per_chunk, pred.chunk_mean or s.chunk_groups)
    return s, est


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) with both >= 0; through the origin when
    the points have one x only."""
    xs = {x for x, _ in points}
    if len(xs) < 2:
        return 0.0, sum(y for _, y in points) / sum(x for x, _ in points)
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    intercept = my - slope * mx
    if intercept < 0 or slope < 0:
        return 0.0, sum(x * y for x, y in points) / sum(x * x for x, _ in points)
    return intercept, slope


def _span(s: Setting) -> int:
    """Optimizer steps one published update spans."""
    return s.sync_every if s.mode == "rapid-async" else max(1, s.batch_groups // s.minibatch_groups)


def _affine(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(value at x = 1, growth per unit of x) of a least-squares line; constant
    (the mean, no growth) when the points have one x only or the slope is < 0."""
    xs = {x for x, _ in points}
    mean_y = statistics.fmean(y for _, y in points)
    if len(xs) < 2:
        return mean_y, 0.0
    mx = statistics.fmean(x for x, _ in points)
    slope = sum((x - mx) * (y - mean_y) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    if slope < 0:
        return mean_y, 0.0
    return mean_y + slope * (1 - mx), slope


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y = k x through the origin (0 without data)."""
    den = sum(x * x for x, _ in points)
    return max(0.0, sum(x * y for x, y in points) / den) if den else 0.0


def calibrate(runs: list[Any]) -> Costs:
    """Costs that explain the measured `runs` (one or more `measure.RunCosts`)."""
    if not runs:
        raise ValueError("calibration needs at least one measured run")
    fitted = [standalone_costs(run) for run in runs]
    train_fixed, train_per_group = _line([(s.minibatch_groups, e["learner/train"])
                                          for s, e in fitted])
    publish, publish_growth = _affine([(_span(s), e["learner/publish"]) for s, e in fitted])
    apply, apply_growth = _affine([(_span(s), e["actor/apply"]) for s, e in fitted])
    gen_fixed, gen_per_group = _line([(e["chunk"], e["actor/gen_group"] * e["chunk"])
                                      for _, e in fitted])

    def mean(key: str) -> float:
        return statistics.fmean(e[key] for _, e in fitted)

    evals = [e["learner/eval"] for _, e in fitted if e["learner/eval"] > 0]
    actor_evals = [e["actor/eval"] for _, e in fitted if e["actor/eval"] > 0]
    points = [p for run in runs for p in run.is_points]
    return Costs(train_per_group=train_per_group, train_fixed=train_fixed,
                 gen_per_group=gen_per_group, gen_fixed=gen_fixed,
                 publish=publish, publish_growth=publish_growth,
                 publish_bg=mean("publisher/encode"), other=mean("learner/other"),
                 apply=apply, apply_growth=apply_growth,
                 eval=statistics.fmean(evals) if evals else 0.0,
                 actor_eval=statistics.fmean(actor_evals) if actor_evals else 0.0,
                 truncated_per_version=_slope([(s, t) for s, t, _ in points]),
                 ess_loss_per_version=_slope([(s, 1.0 - e) for s, _, e in points]))
