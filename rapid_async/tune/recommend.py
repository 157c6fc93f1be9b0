"""`rapid-tune recommend --config C`: calibrate, predict, recommend a setting, verify it.

Used from the command line on the node that will run the job. Steps:

1. Two short calibration trials (real `rapid-run`s, `trials.run_trial`): the
   config as given, and the same with a quarter of the mini-batch and chunk
   and another sync_every (H in the synchronous modes), so that training,
   generation, publishing and applying are each measured at two sizes.
2. `calibrate.calibrate` turns them into per-operation costs.
3. The cost model predicts every setting of a grid around the config: actors
   per learner, minibatch_groups (batch_groups with it in rapid-async),
   max_staleness, buffer_groups (as versions of data in flight), sync_every,
   chunk_groups and, on a node with several GPUs, the learner's share of them.
4. The rule (`Rules`): the highest predicted updates/s among settings whose
   predicted mean staleness, truncated-weight fraction and dropped fraction
   stay under the thresholds and whose mini-batch is not below the floor;
   among settings within `within` of that rate, the lowest mean staleness, then
   the fewest dropped groups, the fewest actors, the largest mini-batch, the
   smallest buffer and the most frequent publishing. Every threshold is a
   command-line option. Updates/s is the objective because each update is one
   step of the optimizer; the mini-batch floor keeps it from buying updates
   with ever noisier gradients.
5. The choice is printed as config lines and written as a full TOML config
   (ROOT/recommended.toml) with the prediction in its header, then run as a
   verification trial and reported as measured against predicted
   (ROOT/recommend.md, ROOT/recommend.json).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rapid_async.tune.model import Costs, Prediction, Setting, predict


@dataclass
class Rules:
    """What `recommend` may choose (command-line options of the same names)."""

    max_mean_staleness: float = 3.0
    """Highest predicted mean staleness of consumed groups (versions)."""
    max_truncated: float = 0.05
    """Highest predicted fraction of truncated importance weights."""
    max_dropped: float = 0.2
    """Highest predicted fraction of generated groups dropped as stale."""
    min_minibatch_groups: int = 0
    """Smallest mini-batch (0: a quarter of the config's)."""
    max_actors: int = 0
    """Most actors per learner (0: one per device, plus one)."""
    within: float = 0.03
    """Settings this close to the best updates/s count as ties."""


def node_devices() -> tuple[str, int]:
    """("cuda", GPUs) on a GPU node, else ("cpu", cores this process may use)."""
    from rapid_async.launch import _gpu_count

    gpus = _gpu_count()
    return ("cuda", gpus) if gpus else ("cpu", len(os.sched_getaffinity(0)))


def calibration_settings(base: Setting) -> list[tuple[str, Setting]]:
    """The calibration trials: the base setting and one with a quarter-size mini-batch."""
    mb = max(1, base.minibatch_groups // 4)
    h = max(1, base.batch_groups // base.minibatch_groups)
    stale = max(1, base.max_staleness)
    small = dataclasses.replace(
        base, minibatch_groups=mb, batch_groups=mb if base.mode == "rapid-async" else mb * 2 * h,
        chunk_groups=max(1, base.chunk_groups // 4), buffer_groups=mb * stale,
        max_staleness=stale, sync_every=min(4, stale + 1) if base.sync_every == 1 else 1)
    return [("as configured", base), ("quarter mini-batch and chunk, other sync_every", small)]


def search_space(base: Setting, rules: Rules) -> list[Setting]:
    """Settings the model compares (the base setting included)."""
    floor = rules.min_minibatch_groups or max(1, base.minibatch_groups // 4)
    mbs = sorted({m for m in (1, 2, 4, 8, 16, 32, 64, 128, 256) if floor <= m
                  <= 2 * base.minibatch_groups} | {base.minibatch_groups})
    gpus = base.kind == "cuda"
    max_actors = rules.max_actors or (2 * base.devices if gpus else base.devices + 1)
    splits = range(1, base.devices) if gpus and base.devices > 2 and _gpu_split_supported() \
        else [base.learner_devices]

    def actor_counts(m: int) -> list[int]:
        if not gpus:  # cores: every count up to the limit
            return list(range(1, max_actors + 1))
        free = max(1, base.devices - m)  # GPUs: one or two actors per actor GPU
        return sorted({n for n in (free, 2 * free) if n <= max_actors} or {max_actors})

    out = {base}
    combos = [(mb, actors, m) for mb in mbs for m in splits for actors in actor_counts(m)]
    for mb, actors, m in combos:
        if base.mode != "rapid-async":
            h = max(1, base.batch_groups // base.minibatch_groups)
            for hh, chunk in itertools.product({h, 2 * h, max(1, h // 2)}, {mb, 2 * mb}):
                out.add(dataclasses.replace(base, minibatch_groups=mb, batch_groups=mb * hh,
                                            chunk_groups=chunk, actors=actors,
                                            learner_devices=m))
            continue
        # a coarser grid on GPU nodes, where the splits and actor counts multiply it
        grid = ((1, 2, 4), (1, 2, 4)) if gpus else ((1, 2, 3, 4, 6), (1, 2, 3, 4, 6))
        for stale, depth, sync, chunk in itertools.product(
                *grid, (1, 2, 4), {mb, 2 * mb} if gpus else {mb, 2 * mb, base.chunk_groups}):
            if sync > stale + 1:  # every group would be stale on arrival
                continue
            out.add(dataclasses.replace(base, minibatch_groups=mb, batch_groups=mb,
                                        max_staleness=stale, buffer_groups=mb * depth,
                                        sync_every=sync, chunk_groups=chunk, actors=actors,
                                        learner_devices=m))
    return sorted(out, key=lambda s: s.label())


def _gpu_split_supported() -> bool:
    """Whether rapid-run places a learner on several GPUs (`learner.devices` > 1):
    its device plan then takes the learner's device count."""
    import inspect

    from rapid_async import launch

    return any("learner" in p for p in inspect.signature(launch.device_plan).parameters)


def allowed(p: Prediction, rules: Rules) -> bool:
    return (p.updates_per_s > 0 and p.staleness_mean <= rules.max_mean_staleness
            and p.truncated_frac <= rules.max_truncated and p.drop_frac <= rules.max_dropped)


def choose(preds: list[Prediction], rules: Rules) -> Prediction | None:
    """The rule of the module docstring; None when no setting is allowed."""
    ok = [p for p in preds if allowed(p, rules)]
    if not ok:
        return None
    best = max(p.updates_per_s for p in ok)
    ties = [p for p in ok if p.updates_per_s >= best * (1 - rules.within)]
    return min(ties, key=lambda p: (round(p.staleness_mean, 2), round(p.drop_frac, 2),
                                    p.setting.actors, -p.setting.minibatch_groups,
                                    p.setting.buffer_groups, p.setting.sync_every,
                                    -p.updates_per_s))


def search(costs: Costs, base: Setting, rules: Rules) -> tuple[Prediction | None, int]:
    """Predict the whole search space; return the choice and how many were compared."""
    preds = [predict(costs, s, updates=60) for s in search_space(base, rules)]
    chosen = choose(preds, rules)
    return (predict(costs, chosen.setting) if chosen else None), len(preds)


def prediction_row(p: Prediction) -> dict[str, float]:
    return {"updates_per_s": p.updates_per_s, "learner_wait": p.learner.get("wait", 0.0),
            "actor_busy": p.actor_busy, "mean_staleness": p.staleness_mean,
            "drop_frac": p.drop_frac, "truncated_frac": p.truncated_frac,
            "ess_per_group": p.ess_per_group}


def measured_row(run: Any) -> dict[str, float]:
    busy = [a.busy_frac for a in run.actors]
    return {"updates_per_s": run.updates_per_s,
            "learner_wait": run.learner_fracs().get("wait_s", 0.0),
            "actor_busy": sum(busy) / len(busy) if busy else float("nan"),
            "mean_staleness": run.staleness_mean, "drop_frac": run.drop_frac,
            "truncated_frac": run.truncated_frac, "ess_per_group": run.ess_per_group}


def config_lines(s: Setting) -> list[str]:
    return [f"actors = {s.actors}   (rapid-run --actors {s.actors})",
            *(o.replace("=", " = ", 1) for o in s.overrides())]


def write_toml(config: str | None, fixed: list[str], p: Prediction, out: Path,
               rules: Rules) -> Path:
    """The base config with the recommended setting, as a TOML file with the
    prediction in its header."""
    from rapid_async.config import dumps_toml, load_config

    cfg = load_config(config, [*fixed, *p.setting.overrides()])
    row = prediction_row(p)
    head = [f"# rapid-tune recommend from {config or 'the defaults'}; run it with",
            f"#   rapid-run --config {out} --actors {p.setting.actors}",
            f"# predicted: {row['updates_per_s']:.2f} updates/s, learner waits "
            f"{row['learner_wait']:.0%}, actors busy {row['actor_busy']:.0%}, mean staleness "
            f"{row['mean_staleness']:.2f}, dropped {row['drop_frac']:.0%}, truncated "
            f"{row['truncated_frac']:.3f}",
            f"# rules: {json.dumps(dataclasses.asdict(rules))}", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(head) + dumps_toml(cfg))
    return out


def comparison(pred: dict[str, float], meas: dict[str, float]) -> str:
    lines = ["| | predicted | measured |", "|---|---|---|"]
    for key, fmt in [("updates_per_s", ".2f"), ("learner_wait", ".0%"), ("actor_busy", ".0%"),
                     ("mean_staleness", ".2f"), ("drop_frac", ".0%"),
                     ("truncated_frac", ".4f"), ("ess_per_group", ".3f")]:
        lines.append(f"| {key} | {pred[key]:{fmt}} | {meas[key]:{fmt}} |")
    return "\n".join(lines)


def recommend(config: str | None, budget_s: float, root: Path, actors: int | None = None,
              fixed: list[str] | None = None, rules: Rules | None = None,
              verify: bool = True, out: Path | None = None,
              steps: int | None = None) -> dict[str, Any]:
    """The whole `rapid-tune recommend` (see the module docstring); returns its results.
    With `steps`, every trial runs that many updates and `budget_s` bounds each
    trial instead of being shared out, so a slow machine still measures a run."""
    from rapid_async.config import load_config
    from rapid_async.tune.calibrate import calibrate
    from rapid_async.tune.measure import measure_run
    from rapid_async.tune.trials import run_trial

    t_start = time.monotonic()
    fixed, rules = fixed or [], rules or Rules()
    cfg = load_config(config, fixed)
    kind, devices = node_devices()
    base = Setting.from_config(cfg, actors=actors or max(1, devices - 1), devices=devices,
                               kind=kind)
    if steps is not None and steps < 4:
        raise ValueError(f"--steps must be at least 4 (a run is measured over 4 updates), got {steps}")
    per_trial = budget_s if steps else budget_s * (0.3 if verify else 0.5)
    verify_s = budget_s if steps else budget_s * 0.4
    length = (lambda s: f"{steps} updates, at most {s:.0f} s") if steps else (lambda s: f"{s:.0f} s")
    runs = []
    for i, (name, s) in enumerate(calibration_settings(base)):
        print(f"[rapid-tune] calibration {i + 1}/2 ({name}, {length(per_trial)}): {s.label()}",
              flush=True)
        run_dir = run_trial(config, [*fixed, *s.overrides()], root / f"calibrate-{i}",
                            per_trial, s.actors, max_steps=steps)
        runs.append(measure_run(run_dir))
        print(f"[rapid-tune]   measured {runs[-1].updates_per_s:.2f} updates/s", flush=True)
    costs = calibrate(runs)
    chosen, compared = search(costs, base, rules)
    if chosen is None:
        raise ValueError("no setting meets the rules; relax --max-mean-staleness, "
                         "--max-truncated or --max-dropped")
    base_pred = predict(costs, base)
    toml = write_toml(config, fixed, chosen, out or root / "recommended.toml", rules)
    print(f"[rapid-tune] compared {compared} settings on {devices} {kind} device(s); "
          "recommended:", flush=True)
    for line in config_lines(chosen.setting):
        print(f"  {line}", flush=True)
    print(f"[rapid-tune] predicted {chosen.updates_per_s:.2f} updates/s (the config as given: "
          f"{base_pred.updates_per_s:.2f} predicted, {runs[0].updates_per_s:.2f} measured); "
          f"wrote {toml}", flush=True)
    result = {"costs": dataclasses.asdict(costs), "rules": dataclasses.asdict(rules),
              "base": {"setting": dataclasses.asdict(base), "predicted": prediction_row(base_pred),
                       "measured": measured_row(runs[0])},
              "recommended": {"setting": dataclasses.asdict(chosen.setting),
                              "predicted": prediction_row(chosen)},
              "toml": str(toml), "compared": compared}
    if verify:
        print(f"[rapid-tune] verification trial ({length(verify_s)})", flush=True)
        run_dir = run_trial(config, [*fixed, *chosen.setting.overrides()], root / "verify",
                            verify_s, chosen.setting.actors, max_steps=steps)
        result["recommended"]["measured"] = measured_row(measure_run(run_dir))
        print(comparison(result["recommended"]["predicted"], result["recommended"]["measured"]),
              flush=True)
    result["wall_s"] = time.monotonic() - t_start
    _write_summary(root, config, result)
    return result


def _write_summary(root: Path, config: str | None, result: dict[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "recommend.json").write_text(json.dumps(result, indent=1, default=str))
    rec = result["recommended"]
    lines = [f"# rapid-tune recommend: {config}", "",
             f"{result['compared']} settings compared; wall time {result['wall_s']:.0f} s.", "",
             "Recommended (`" + "`, `".join(config_lines(Setting(**rec["setting"]))) + "`)", ""]
    if "measured" in rec:
        lines += [comparison(rec["predicted"], rec["measured"]), ""]
    lines += ["The config as given:", "", comparison(result["base"]["predicted"],
                                                     result["base"]["measured"]), ""]
    (root / "recommend.md").write_text("\n".join(lines))
