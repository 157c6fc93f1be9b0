"""The results file of `bin/bench-peer` (`rapid_async.bench.peer`): markdown + JSON.

`write_report(results, meta, out)` writes OUT (markdown: per-run table,
medians over seeds on both clocks, updates/s, generated tokens/s, the
hyper-parameter mapping, the done-criterion's ratios) and OUT with .json (the
raw rows of every run, the summaries and `meta`).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from rapid_async.bench.peer import median_or_none, summarise
from rapid_async.bench.peer_trl import MAPPING

NOT_REACHED = "not reached"


def _fmt(v: Any, spec: str = ".1f", none: str = "-") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return none
    return format(v, spec)


def medians(summaries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per setting: median seconds to target on both clocks (None: not reached
    by the median run), runs reaching it, mean updates/s and tokens/s."""
    out = {}
    for setting in dict.fromkeys(s["setting"] for s in summaries):
        rs = [s for s in summaries if s["setting"] == setting]

        def mean(key: str) -> float | None:
            values = [s[key] for s in rs if s[key] is not None]
            return statistics.mean(values) if values else None

        out[setting] = {"train_s": median_or_none([s["to_target_train_s"] for s in rs]),
                        "wall_s": median_or_none([s["to_target_wall_s"] for s in rs]),
                        "reached": sum(s["to_target_train_s"] is not None for s in rs),
                        "runs": len(rs), "updates_per_s": mean("updates_per_s"),
                        "tokens_per_s": mean("tokens_per_s")}
    return out


def ratios(med: dict[str, dict[str, Any]], clock: str) -> dict[str, Any]:
    """The done-criterion's ratios on one clock: rapid-async / TRL's best setting
    (target <= 0.75) and rapid-sync / TRL on-policy (target <= 1.0)."""
    def t(name: str) -> float | None:
        return med.get(name, {}).get(clock)

    trl = [(t(n), n) for n in ("trl-on-policy", "trl-spg4") if t(n) is not None]
    best = min(trl) if trl else (None, None)
    out: dict[str, Any] = {"trl_best": best[1]}
    for key, num, den, limit in (("async_vs_trl_best", t("rapid-async"), best[0], 0.75),
                                 ("sync_vs_trl_on_policy", t("rapid-sync"), t("trl-on-policy"), 1.0)):
        value = num / den if num is not None and den else None
        out[key] = {"value": value, "limit": limit,
                    "met": value is not None and value <= limit}
    return out


def _ratio_line(name: str, r: dict[str, Any]) -> str:
    value = _fmt(r["value"], ".2f", "n/a (a median not reached)")
    return f"{name}: {value} (limit {r['limit']:g}) -> {'met' if r['met'] else 'NOT met'}"


def write_report(results: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    """Write the markdown table and the JSON of `results` (see module docstring)."""
    target = meta["target"]
    summaries = [summarise(r, target, meta["seconds"]) for r in results]
    med = medians(summaries)
    rat = {clock: ratios(med, clock) for clock in ("train_s", "wall_s")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "summaries": summaries, "medians": med, "ratios": rat,
         "runs": results}, indent=1, default=str))
    budget = f"{meta['seconds']:g} s"
    lines = [
        "# TRL GRPOTrainer vs rapid_async on the CPU task (tiny warm model, 2-digit arithmetic)",
        "",
        f"Command: `{meta['command']}`",
        f"Machine: {meta['cpus']} CPUs. {meta.get('note') or ''}",
        "",
        f"Every run: the warm model, the train prompts 0, 1, 2, ... of `{meta['config']}`'s task, "
        "the project's Scorer as reward, greedy held-out success on rapid-run's evaluation "
        f"problems (`run_evaluation`, run.eval_size of them); budget {budget} of training. "
        + ("A run stops at its first evaluation at or above the target (`--full` runs the "
           "whole budget). " if meta["stop_at_target"] else "")
        + "rapid-run gets 30 s more on its learner's clock, which starts before the actor's "
        "start-up; evaluations past the budget (+5%) on the training clock do not count. "
        + f"TRL evaluates every {meta['eval_every_s']:g} training seconds, rapid-run every "
        f"{meta['eval_every']} versions (the eval gap column is the median seen).",
        "",
        "Clocks (both leave out TRL's evaluations, which pause its training; rapid-run's "
        "run on the actor meanwhile): **training** = seconds since the first rollout began "
        "(TRL: on_train_begin, its first step generates; rapid-run: the actor's work loop "
        "start, after its model load); **wall** = seconds since the process was launched "
        "(imports, model load, rapid-run's learner and actor start-up). updates/s = "
        "optimizer steps per training second; tokens/s = generated completion tokens per "
        "training second.",
        "",
        f"## Seconds to held-out {target:g} (median over seeds; runs not reaching it count as "
        f"never; '{NOT_REACHED}' = not reached in {budget})",
        "",
        "| setting | training clock (s) | wall clock (s) | runs reaching | updates/s | gen tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in med.items():
        lines.append(f"| {name} | {_fmt(m['train_s'], '.1f', NOT_REACHED)} | "
                     f"{_fmt(m['wall_s'], '.1f', NOT_REACHED)} | {m['reached']}/{m['runs']} | "
                     f"{_fmt(m['updates_per_s'], '.2f')} | {_fmt(m['tokens_per_s'], '.0f')} |")
    lines += ["", "## Done criterion (ratios of the medians)", ""]
    for clock, label in (("train_s", "training clock"), ("wall_s", "wall clock")):
        r = rat[clock]
        lines += [f"- {label}, TRL's best setting: {r['trl_best'] or '-'}",
                  "  - " + _ratio_line("rapid-async / TRL best", r["async_vs_trl_best"]),
                  "  - " + _ratio_line("rapid-sync / TRL on-policy", r["sync_vs_trl_on_policy"])]
    lines += ["", "## Per run", "",
              "| setting | seed | to target, training (s) | to target, wall (s) | start | best | "
              "last | steps | training s | updates/s | gen tok/s | eval gap (s) | uptime before | "
              "uptime after |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(
            f"| {s['setting']} | {s['seed']} | {_fmt(s['to_target_train_s'], '.1f', NOT_REACHED)} | "
            f"{_fmt(s['to_target_wall_s'], '.1f', NOT_REACHED)} | {_fmt(s['start'], '.3f')} | "
            f"{_fmt(s['best'], '.3f')} | {_fmt(s['last'], '.3f')} | {s['steps']} | "
            f"{_fmt(s['train_s'], '.1f')} | {_fmt(s['updates_per_s'], '.2f')} | "
            f"{_fmt(s['tokens_per_s'], '.0f')} | {_fmt(s['eval_gap_s'], '.1f')} | "
            f"{_load(s['load_before'])} | {_load(s['load_after'])} |")
    lines += profile_lines(results)
    lines += ["", "## Hyper-parameters: quickstart.toml -> TRL 1.16 GRPOConfig", "",
              "| rapid_async | TRL |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in MAPPING]
    lines += ["", "rapid-run modes use `bin/bench-modes`' overrides (`MODE_OVERRIDES` in "
              "rapid_async/bench/modes.py): grpo = loss grpo, beta 0.04, one update per "
              "32-group round; rapid-sync = 128-group rounds, 4 updates each; rapid-async = "
              "quickstart.toml. TRL uses both cores in one process (torch threads 2); rapid-run "
              "pins its learner and its actor to one core each."]
    out.write_text("\n".join(lines) + "\n")


def _load(uptime: str | None) -> str:
    """'load average: a, b, c' -> 'a' (the 1-minute figure)."""
    if not uptime or "load average:" not in uptime:
        return "-"
    return uptime.split("load average:")[1].split(",")[0].strip()


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def profile_means(results: list[dict[str, Any]], setting: str) -> dict[str, float] | None:
    """Mean over seeds of a rapid setting's wait profile (`peer.wait_profile`)."""
    profiles = [r["profile"] for r in results if r["setting"] == setting and r.get("profile")]
    if not profiles:
        return None
    return {k: statistics.mean(p[k] for p in profiles) for k in profiles[0]}


def round_model(p: dict[str, float], updates_per_round: int) -> dict[str, float]:
    """Seconds per round of a synchronous mode from its measured per-operation
    costs, as run (generate the whole round, then train it) and with the
    round's mini-batches trained as they arrive (the first once its chunk is
    in, each next one as soon as both its chunk and the previous update are
    done): g = generation per chunk, u = one update, o = the rest of a round
    (publishing, weight apply, hand-offs) as measured."""
    steps = max(p["steps"], 1)
    rounds = max(steps / updates_per_round, 1)
    g = p["actor/gen_s"] / max(p["actor/chunks"], 1)
    u = p["learner/busy_s"] / steps
    # from the first step to the last: steps - 1 update intervals
    measured = (p["train_s"] - p["first_train_s"]) * updates_per_round / max(steps - 1, 1)
    chunks = max(round(p["actor/chunks"] / rounds), 1)
    sequential = chunks * g + updates_per_round * u
    other = max(measured - sequential, 0.0)
    pipelined = g + (updates_per_round - 1) * max(g, u) + u if chunks == updates_per_round else sequential
    return {"g": g, "u": u, "chunks": chunks, "measured": measured, "other": other,
            "pipelined": pipelined + other, "speedup": measured / (pipelined + other)}


def profile_lines(results: list[dict[str, Any]]) -> list[str]:
    """The 'where the modes wait' section: learner and actor clocks per mode."""
    rows = [(s, profile_means(results, s)) for s in ("grpo", "rapid-sync", "rapid-async")]
    rows = [(s, p) for s, p in rows if p]
    if not rows:
        return []
    lines = ["", "## Where the modes wait (mean over seeds; cumulative clocks at the last step)", "",
             "Learner: of its active seconds, waiting for data before the first step (the "
             "actor's start-up and first round), waiting for data after it, training, blocked "
             "publishing. Actor: of its loop's seconds, generating, applying weights, "
             "evaluating, idle (no work granted).", "",
             "| mode | learner s | wait before 1st step | wait after | training | publishing "
             "| per update: train / wait / publish (s) | actor s | generating | applying weights "
             "| evaluating | idle |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s, p in rows:
        t, a, n = max(p["train_s"], 1e-9), max(p["elapsed_s"], 1e-9), max(p["steps"], 1)
        after = p["learner/wait_s"] - p["first_wait_s"]
        pct = lambda v, tot: f"{v:.1f} s ({v / tot:.0%})"  # noqa: E731
        lines.append(
            f"| {s} | {t:.1f} | {pct(p['first_wait_s'], t)} | {pct(after, t)} | "
            f"{pct(p['learner/busy_s'], t)} | {pct(p['learner/publish_s'], t)} | "
            f"{p['learner/busy_s'] / n:.3f} / {after / max(n - 1, 1):.3f} / "
            f"{p['learner/publish_s'] / n:.3f} | {a:.1f} | {pct(p['actor/gen_s'], a)} | "
            f"{pct(p['actor/update_s'], a)} | {pct(p['actor/eval_s'], a)} | "
            f"{pct(p['actor/idle_s'], a)} |")
    sync = dict(rows).get("rapid-sync")
    if sync:
        m = round_model(sync, 4)
        lines += ["", f"rapid-sync round (4 updates on 128 groups, {m['chunks']} chunks of "
                  f"generation): measured {m['measured']:.2f} s per round = {m['chunks']} x "
                  f"{m['g']:.3f} s generating + 4 x {m['u']:.3f} s training + {m['other']:.2f} s "
                  f"other (publish, weight apply, hand-offs). Training each mini-batch as its "
                  f"chunk arrives (same data, same versions, same mini-batches: the buffer is "
                  f"FIFO) would take about {m['pipelined']:.2f} s per round "
                  f"({m['speedup']:.2f}x)."]
    return lines
