"""Audit of a finished run: was every prompt trained at most once, and none lost?

Not on the runtime path: used by the chaos test (and by hand, `python -m
rapid_async.audit RUN_DIR`) on what a run leaves behind, RUN_DIR/metrics.jsonl
and the newest checkpoint. It relies on three records the learner writes:

- each step record lists the prompts it trained (`trained/prompts`; with grant
  ids `trained/grants` when the protocol carries them), those a non-finite
  step skipped (`skipped/prompts`), those dropped as too stale since the last
  step (`dropped/prompts`), and how many of its groups came from weights whose
  checksum the learner had not served for their version (`trained/unverified`);
  the end record lists those dropped by the last wait for data (`dropped/prompts`);
- a learner that resumes writes an `event: resume` record with the version it
  resumed from: records of the abandoned lineage (later versions written before
  the restart) are discarded, since the restored weights never saw them;
- a checkpoint records the next new prompt index (`data_position`) and the
  prompts granted but not yet trained (`pending`).

The final lineage then must train each version once and each prompt at most
once, and every prompt below the final data position must be trained, dropped
by the staleness rule (counted), skipped by the non-finite guard (counted) or
pending in the final checkpoint: nothing accepted is lost otherwise.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Audit:
    """What `audit_run` found; `problems` is empty for a sound run."""

    versions: list[int] = field(default_factory=list)
    trained: Counter = field(default_factory=Counter)
    dropped: set = field(default_factory=set)
    skipped: set = field(default_factory=set)
    pending: set = field(default_factory=set)
    data_position: int = 0
    resumes: int = 0
    unverified: int = 0
    twice: list = field(default_factory=list)
    lost: list = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def lineage(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The learner's step records that the final weights descend from, and
    how many resumes cut the history."""
    steps: list[dict[str, Any]] = []
    resumes = 0
    for rec in records:
        if rec.get("role") != "learner":
            continue
        if rec.get("event") == "resume":
            resumes += 1
            steps = [s for s in steps if s["version"] <= rec["version"]]
        elif "trained/prompts" in rec or "skipped/prompts" in rec or "dropped/prompts" in rec:
            steps.append(rec)
    return steps, resumes


def audit(records: list[dict[str, Any]], checkpoint_meta: dict[str, Any]) -> Audit:
    """Check the final lineage of `records` against the final checkpoint."""
    steps, resumes = lineage(records)
    out = Audit(resumes=resumes, data_position=int(checkpoint_meta["data_position"]),
                pending={int(p) for p in checkpoint_meta.get("pending", [])})
    pairs: Counter = Counter()
    for rec in steps:
        if "trained/prompts" in rec:
            out.versions.append(rec["version"])
            prompts = [int(p) for p in rec["trained/prompts"]]
            out.trained.update(prompts)
            pairs.update(zip(prompts, rec.get("trained/grants", [None] * len(prompts))))
        out.skipped.update(int(p) for p in rec.get("skipped/prompts", []))
        out.dropped.update(int(p) for p in rec.get("dropped/prompts", []))
        out.unverified += int(rec.get("trained/unverified", 0))
    _judge(out, pairs, checkpoint_meta)
    return out


def _judge(out: Audit, pairs: Counter, meta: dict[str, Any]) -> None:
    versions = sorted(out.versions)
    if versions and versions != list(range(versions[0], versions[-1] + 1)):
        out.problems.append(f"versions in the final lineage are not each trained once: {versions}")
    if out.versions and max(out.versions) != int(meta["version"]):
        out.problems.append(f"the final checkpoint is version {meta['version']}, the last "
                            f"trained version {max(out.versions)}")
    out.twice = sorted(p for p, n in out.trained.items() if n > 1)
    if out.twice:
        out.problems.append(f"prompts trained twice: {out.twice[:20]}")
    twice_pairs = [pair for pair, n in pairs.items() if n > 1 and pair[1] is not None]
    if twice_pairs:
        out.problems.append(f"(prompt, grant) pairs trained twice: {twice_pairs[:20]}")
    if set(out.trained) & out.pending:
        out.problems.append(f"trained prompts still pending: {sorted(set(out.trained) & out.pending)[:20]}")
    done = set(out.trained) | out.dropped | out.skipped | out.pending
    out.lost = [p for p in range(out.data_position) if p not in done]
    if out.lost:
        out.problems.append(f"{len(out.lost)} prompt(s) neither trained, dropped as stale, "
                            f"skipped nor pending: {out.lost[:20]}")
    if out.unverified:
        out.problems.append(f"{out.unverified} trained group(s) came from weights whose checksum "
                            "the learner did not serve for their version")


def audit_run(run_dir: str | Path) -> Audit:
    """Audit RUN_DIR: metrics.jsonl against the newest checkpoint."""
    from rapid_async.learner.checkpoint import latest_checkpoint, read_meta
    from rapid_async.metrics import read_metrics

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise ValueError(f"{run_dir} has no checkpoint to audit against")
    return audit(read_metrics(run_dir), read_meta(ckpt))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m rapid_async.audit RUN_DIR", file=sys.stderr)
        return 2
    report = audit_run(argv[0])
    print(json.dumps({"versions": len(report.versions), "prompts_trained": len(report.trained),
                      "dropped_stale": len(report.dropped), "skipped": len(report.skipped),
                      "pending": len(report.pending), "resumes": report.resumes,
                      "problems": report.problems}, indent=1))
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
