"""What `rapid-run` reads from and writes into a run directory (`rapid_async.launch`).

The learner's latest step record and evaluation (progress lines, `rapid-tune`
trials), the actors' busy fractions, the learner id in RUN_DIR/learner.json,
the end-of-run summary and plots, and the CURVE key pair for the actors
rapid-run starts itself (RUN_DIR/keys/).
"""

from __future__ import annotations

import json
from pathlib import Path

from rapid_async.config import Config


def _last_learner_record(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - 65536))
        lines = f.read().decode(errors="replace").splitlines()
    latest, evaluation = None, None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("role") != "learner":
            continue
        if evaluation is None and isinstance(rec.get("eval/success"), (int, float)):
            evaluation = rec  # the newest evaluation result (its own record)
        if latest is None and "step" in rec:
            latest = dict(rec)
        if latest is not None and evaluation is not None:
            break
    if latest is not None and evaluation is not None:
        latest.setdefault("eval/success", evaluation["eval/success"])
        latest.setdefault("eval/version", evaluation.get("eval/version"))
    return latest


def _actor_busy(run_dir: Path) -> str:
    path = run_dir / "metrics.jsonl"
    latest: dict[str, float] = {}
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 65536))
            for line in f.read().decode(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("role") == "actor" and "actor/busy_frac" in rec:
                    latest[rec["actor_id"]] = rec["actor/busy_frac"]
    except OSError:
        return "-"
    return " ".join(f"{v:.0%}" for _, v in sorted(latest.items())) or "-"


def _learner_id(run_dir: Path) -> str | None:
    """The learner_id in RUN_DIR/learner.json (None: no file or none in it)."""
    try:
        return json.loads((run_dir / "learner.json").read_text()).get("learner_id")
    except (OSError, ValueError, AttributeError):
        return None


def local_actor_keys(cfg: Config, run_dir: Path) -> tuple[list[str], list[str]]:
    """With CURVE on, a key pair for the actors rapid-run starts itself
    (RUN_DIR/keys/local-actors.*, made once), authorized beside the configured
    keys. Returns (extra learner arguments, extra actor arguments)."""
    import shutil

    from rapid_async.wire.security import learner_curve, write_key_pair

    t = cfg.transport
    if not t.curve_secret_key:
        return [], []
    learner_curve(t)  # every configured key file readable, or a ValueError naming it
    keys = run_dir / "keys"
    if not (keys / "local-actors.key_secret").is_file():
        for stale in keys.glob("local-actors.key*"):
            stale.unlink()
        write_key_pair(keys, "local-actors")
    authorized = keys / "authorized"  # the configured keys and ours, rebuilt every start
    shutil.rmtree(authorized, ignore_errors=True)
    authorized.mkdir(parents=True)
    source = Path(t.authorized_keys)
    files = sorted(source.glob("*.key")) if source.is_dir() else [source]
    for i, path in enumerate([*files, keys / "local-actors.key"]):
        shutil.copyfile(path, authorized / f"{i:03d}-{path.name}")
    return (["--set", f"transport.authorized_keys={authorized}"],
            ["--curve-secret-key", str(keys / "local-actors.key_secret"),
             "--curve-public-key", t.curve_public_key])


def _print_summary(run_dir: Path) -> None:
    from rapid_async.metrics import plot_run, read_metrics

    try:
        recs = [r for r in read_metrics(run_dir) if r.get("role") == "learner"]
    except FileNotFoundError:
        return
    evals = sorted(((r.get("eval/version", r.get("version", 0)), r["eval/success"]) for r in recs
                    if isinstance(r.get("eval/success"), (int, float))), key=lambda e: e[0])
    if len(evals) >= 2:
        (v0, before), (v1, after) = evals[0], evals[-1]
        print(f"[rapid-run] held-out success: before {before:.3f} (version {v0}), "
              f"after {after:.3f} (version {v1})", flush=True)
    for r in recs:
        if r.get("event") == "eval_missing":
            print(f"[rapid-run] no {r.get('eval/kind')} evaluation of version "
                  f"{r.get('eval/requested_version')}: {r.get('reason')}", flush=True)
    try:
        print(f"[rapid-run] plots: {plot_run(run_dir)}", flush=True)
    except ValueError as exc:
        print(f"[rapid-run] no plots: {exc}", flush=True)
