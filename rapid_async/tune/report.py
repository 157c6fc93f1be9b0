"""`rapid-tune report RUN_DIR`: which role limits a run, why, in numbers, and what would move it.

Used from the command line (the rapid-tune process), on a finished or running
run directory. It prints, over the run's steady window (`measure`):
the learner's seconds per update split into waiting for data, training,
publishing, evaluating, checkpointing and the rest; per actor the generation
seconds per group, groups per generate call, weight-apply seconds per update
and busy fraction; the staleness distribution of consumed groups; the
truncated-weight fraction and effective sample size of the loss (mean and
worst group), the share of token ratios outside [0.5, 2]; the engine/trainer
mismatch on staleness-0 tokens (`mismatch/k3`, `mismatch/ratio_outside`, with a
warning when large); groups dropped as stale. Then a diagnosis (which role limits the run and the rule
that says so) and single changes to the setting ranked by the cost model
(`model`), calibrated on this very run, each with its predicted updates/s,
staleness and dropped fraction.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rapid_async.tune.model import Costs, Prediction, Setting, predict

WAIT_LIMIT = 0.15
"""The learner waiting this share of its time or more means the actors limit the run."""
PUBLISH_LIMIT = 0.2
"""Publishing this share of the learner's time or more is worth batching (sync_every)."""
DROP_LIMIT = 0.1
"""Dropping this share of generated groups or more wastes generation."""
TRUNCATED_LIMIT = 0.05
"""Truncating this share of importance weights or more biases the loss noticeably."""
MISMATCH_K3_LIMIT = 0.01
"""KL(mu || pi) per token at staleness 0 (`mismatch/k3`) at or above this means the
inference engine and the trainer disagree at the same weights."""
MISMATCH_OUTSIDE_LIMIT = 0.01
"""A share of staleness-0 token ratios outside [0.5, 2] at or above this: engine mismatch."""


def single_changes(s: Setting) -> list[tuple[str, Setting]]:
    """One-knob changes of a setting worth predicting (label, new setting)."""
    r = dataclasses.replace
    out = [(f"actors {s.actors} -> {s.actors + 1}", r(s, actors=s.actors + 1))]
    if s.mode == "rapid-async":
        mb = s.minibatch_groups
        out.append((f"learner.max_staleness {s.max_staleness} -> {s.max_staleness + 1}",
                    r(s, max_staleness=s.max_staleness + 1)))
        if s.max_staleness > 0:
            out.append((f"learner.max_staleness {s.max_staleness} -> {s.max_staleness - 1}",
                        r(s, max_staleness=s.max_staleness - 1)))
        out.append((f"learner.sync_every {s.sync_every} -> {s.sync_every * 2}",
                    r(s, sync_every=s.sync_every * 2)))
        if mb >= 2 and mb % 2 == 0:
            out.append((f"learner.minibatch_groups {mb} -> {mb // 2} (batch_groups and "
                        "buffer_groups halved too)",
                        r(s, minibatch_groups=mb // 2, batch_groups=mb // 2,
                          buffer_groups=max(mb // 2, s.buffer_groups // 2))))
        fit = mb * max(1, s.max_staleness)
        if fit != s.buffer_groups:
            out.append((f"learner.buffer_groups {s.buffer_groups} -> {fit} (max_staleness x "
                        "minibatch_groups)", r(s, buffer_groups=fit)))
    else:
        if s.batch_groups // s.minibatch_groups > 1:
            out.append(("run.mode -> rapid-async", r(s, mode="rapid-async",
                                                     batch_groups=s.minibatch_groups)))
        out.append((f"learner.batch_groups {s.batch_groups} -> {s.batch_groups * 2}",
                    r(s, batch_groups=s.batch_groups * 2)))
    out.append((f"actor.chunk_groups {s.chunk_groups} -> {s.chunk_groups * 2}",
                r(s, chunk_groups=s.chunk_groups * 2)))
    if s.chunk_groups > 1:
        out.append((f"actor.chunk_groups {s.chunk_groups} -> {s.chunk_groups // 2}",
                    r(s, chunk_groups=s.chunk_groups // 2)))
    if s.kind == "cuda" and s.devices > 2 and s.learner_devices < s.devices - 1:
        out.append((f"learner.devices {s.learner_devices} -> {s.learner_devices + 1} "
                    f"(actors on the other {s.devices - s.learner_devices - 1})",
                    r(s, learner_devices=s.learner_devices + 1,
                      actors=max(1, s.devices - s.learner_devices - 1))))
    return out


def diagnose(run: Any) -> list[str]:
    """Sentences that name the limiting role and the reasons, with the numbers."""
    fr = run.learner_fracs()
    wait, publish = fr.get("wait_s", 0.0), fr.get("publish_s", 0.0)
    busy = [a.busy_frac for a in run.actors]
    actor_busy = sum(busy) / len(busy) if busy else float("nan")
    out = []
    mode = run.config.run.mode
    if mode != "rapid-async":
        out.append(f"The roles take turns (run.mode = {mode}): the learner waits for each round "
                   f"{wait:.0%} of the time and the actors are busy {actor_busy:.0%}; more actors "
                   "shorten the rounds, rapid-async overlaps generation with training.")
    elif wait >= WAIT_LIMIT:
        out.append(f"The actors limit this run: the learner waits for data {wait:.0%} of the "
                   f"time while the actors are busy {actor_busy:.0%}.")
    else:
        out.append(f"The learner limits this run: it waits for data only {wait:.0%} of the time "
                   f"(training {fr.get('train_s', 0):.0%}, publishing {publish:.0%}), while the "
                   f"actors are busy {actor_busy:.0%}.")
    if publish >= PUBLISH_LIMIT:
        out.append(f"Publishing weights takes {publish:.0%} of the learner's time "
                   f"({run.publish_per_stage * 1e3:.0f} ms per version): a larger "
                   "learner.sync_every publishes less often.")
    step = run.learner["train_s"]
    if run.publisher_thread and step > 0 and run.encode_per_publication / run.span / step >= 0.2:
        out.append(f"The publisher thread encodes each version in "
                   f"{run.encode_per_publication * 1e3:.0f} ms on the learner's device, "
                   f"{run.encode_per_publication / run.span / step:.0%} of a training step's time "
                   "per step: a larger learner.sync_every encodes less often.")
    if fr.get("eval_s", 0.0) >= 0.1:
        out.append(f"Held-out evaluation takes {fr['eval_s']:.0%} of the learner's time: "
                   "evaluate less often (run.eval_every).")
    if run.drop_frac >= DROP_LIMIT:
        out.append(f"{run.drop_frac:.0%} of generated groups were dropped as stale: "
                   f"{_why_dropped(run.config)}.")
    if run.truncated_frac >= TRUNCATED_LIMIT:
        out.append(f"{run.truncated_frac:.1%} of importance weights are truncated (ESS per group "
                   f"{run.ess_per_group:.2f}): the data is too stale for this learning rate; "
                   "lower learner.max_staleness or learner.buffer_groups.")
    out += _mismatch_warnings(run)
    applying = [a.apply_s / a.window_s for a in run.actors if a.window_s > 0]
    if applying and max(applying) >= 0.2:
        out.append(f"Actors spend up to {max(applying):.0%} of their time applying weights: "
                   "a larger learner.sync_every sends fewer updates.")
    return out


def _mismatch_warnings(run: Any) -> list[str]:
    """The engine/trainer mismatch warning, when staleness-0 tokens show one."""
    k3, outside = run.mismatch_k3, run.mismatch_ratio_outside
    if not (k3 >= MISMATCH_K3_LIMIT or outside >= MISMATCH_OUTSIDE_LIMIT):  # nan: no data
        return []
    return [f"Engine/trainer mismatch: at staleness 0 (same weights) the learner's and the "
            f"actor's token log-probs differ by k3 = {k3:.4f} nats per token (KL(mu || pi)) "
            f"and {outside:.1%} of token ratios lie outside [0.5, 2]. The importance "
            "weights then correct the engine, not staleness: check that actor and learner "
            "use the same temperature (algo.temperature), that top-k / top-p are off, and "
            "the inference dtype (model.inference_dtype) and kernels."]


def _why_dropped(cfg: Any) -> str:
    """Why groups outlive max_staleness, and what to change."""
    lc = cfg.learner
    depth, lag = lc.buffer_groups / lc.minibatch_groups, lc.sync_every - 1
    if cfg.run.mode == "rapid-async" and depth + lag > lc.max_staleness:
        fits = lc.minibatch_groups * max(1, lc.max_staleness - lag)
        fixes = ([f"lower learner.buffer_groups to {fits}"] if fits < lc.buffer_groups else []) \
            + (["lower learner.sync_every"] if lag else []) + ["raise learner.max_staleness"]
        weights = (f" and the actors' weights lag up to {lag} version(s) (sync_every = "
                   f"{lc.sync_every})" if lag else "")
        return (f"a full buffer holds {depth:.1f} updates of data{weights}, more than "
                f"max_staleness = {lc.max_staleness} allows; " + " or ".join(fixes))
    return (f"groups generated while the learner trains are older than max_staleness = "
            f"{lc.max_staleness} allows by the time they are used; raise learner.max_staleness")


def ranked_changes(costs: Costs, s: Setting) -> tuple[Prediction, list[tuple[str, Prediction]]]:
    """The model's prediction of `s` and of each single change, best updates/s first."""
    base = predict(costs, s)
    preds = [(label, predict(costs, new)) for label, new in single_changes(s)]
    rate = max(base.updates_per_s, 1e-9)
    preds.sort(key=lambda lp: (-round(lp[1].updates_per_s / rate, 2), lp[1].drop_frac,
                               lp[1].staleness_mean))
    return base, preds


def _ms(x: float, digits: int = 1) -> str:
    return "-" if x != x else f"{x * 1e3:.{digits}f}"


def _num(x: float, spec: str) -> str:
    return "-" if x != x else format(x, spec)


def _fmt_hist(hist: dict[int, int]) -> str:
    n = sum(hist.values()) or 1
    return ", ".join(f"{s}: {c / n:.0%}" for s, c in sorted(hist.items()))


def report_text(run_dir: str | Path, top: int = 5) -> str:
    """The whole report for one run directory."""
    from rapid_async.tune.calibrate import calibrate
    from rapid_async.tune.measure import measure_run

    run = measure_run(run_dir)
    s = Setting.from_run(run)
    lines = [f"rapid-tune report: {run_dir}", "",
             f"Setting: {s.label()} on {s.devices} {s.kind} device(s)",
             f"Steady window: steps {run.steps - run.window_steps}-{run.steps} "
             f"({run.window_s:.1f} s): {run.updates_per_s:.2f} updates/s", "",
             f"Learner, seconds per update ({sum(run.learner.values()):.3f} s):"]
    fr = run.learner_fracs()
    for key, name in [("wait_s", "waiting for data"), ("train_s", "training"),
                      ("publish_s", "publishing"), ("eval_s", "evaluating"),
                      ("checkpoint_s", "checkpointing"), ("other_s", "other")]:
        lines.append(f"  {name:<17} {run.learner[key]:8.4f} s  {fr.get(key, 0):4.0%}")
    if run.publisher_thread:
        lines.append(f"  publisher thread: {run.encode_per_publication * 1e3:.1f} ms to encode a "
                     f"version (on the learner's device), {run.superseded} superseded")
    lines.append("Actors:")
    for a in run.actors:
        per_call = "-" if a.groups_per_chunk != a.groups_per_chunk else f"{a.groups_per_chunk:.1f}"
        lines.append(f"  {a.actor_id}: generation {_ms(a.gen_per_group, 2)} ms/group "
                     f"({per_call} groups per call), weight apply "
                     f"{_ms(a.apply_per_update)} ms/update ({a.applies:.0f} updates), busy "
                     f"{a.busy_frac:.0%}, blocked sending {a.send_wait_s:.1f} s"
                     + (f", evaluating {a.eval_s:.1f} s ({a.evals:.0f} evaluations)"
                        if a.evals else ""))
    lines += [f"Staleness of consumed groups: mean {run.staleness_mean:.2f}, max "
              f"{run.staleness_max}; {_fmt_hist(run.staleness_hist)}",
              f"Loss: truncated-weight fraction {run.truncated_frac:.4f}, ESS per group "
              f"{run.ess_per_group:.3f} (worst group {_num(run.ess_min_group, '.3f')}), token "
              f"ratios outside [0.5, 2] {_num(run.ratio_outside, '.4f')}",
              f"Engine/trainer mismatch at staleness 0: k3 {_num(run.mismatch_k3, '.5f')} "
              f"nats/token, ratios outside [0.5, 2] {_num(run.mismatch_ratio_outside, '.4f')}",
              f"Groups: {run.generated} generated, {run.dropped} dropped as stale "
              f"({run.drop_frac:.0%})", "", "Diagnosis:"]
    lines += [f"  {d}" for d in diagnose(run)]
    costs = calibrate([run])
    base, changes = ranked_changes(costs, s)
    lines += ["", f"What would move it (cost model calibrated on this run; it reproduces the "
                  f"run at {base.updates_per_s:.2f} updates/s, staleness "
                  f"{base.staleness_mean:.2f}):"]
    for label, p in changes[:top]:
        lines.append(f"  {label}: {base.updates_per_s:.2f} -> {p.updates_per_s:.2f} updates/s "
                     f"({p.updates_per_s / base.updates_per_s - 1:+.0%}), staleness "
                     f"{p.staleness_mean:.2f}, dropped {p.drop_frac:.0%}, learner waits "
                     f"{p.learner.get('wait', 0):.0%}")
    return "\n".join(lines)
