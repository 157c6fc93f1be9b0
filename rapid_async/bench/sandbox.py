"""Sandbox throughput: MBPP+ programs scored per second through `MBPPTask` (run by `bin/bench-sandbox`).

Not a test and never on the runtime path. Scores the reference solutions of
the first `--n` MBPP+ problems (in data order) as completions, three ways:
`reward` one at a time ("sequential"), `score_batch` all at once
("batch", up to `max_parallel` programs at a time), and the same batch again
("batch, warm": a checker that caches expected outputs has them by then).
Each completion is one program of ours to check; programs/s counts
completions scored per second of wall time, whatever the checker runs for
them (the reference too, in this tree's checker, on first use).

Works against an older tree as well: `bin/bench-sandbox` unpacks it with
`git archive` and runs this file by path with that tree first on PYTHONPATH,
so `rapid_async` is imported from there. Writes one JSON object to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from rapid_async.tasks.mbpp import MBPPTask


def _fenced(code: str) -> str:
    return f"```python\n{code}\n```"


def measure(path: str, n: int, max_parallel: int) -> dict:
    """Wall time and programs/s of the three ways of scoring `n` references."""
    task = MBPPTask(path=path, max_parallel=max_parallel)
    problems = ([task.train_problem(i) for i in range(task.train_size)]
                + task.heldout(task.heldout_size))
    problems = sorted(problems, key=lambda p: int(p.prompt_id.split("/")[-1]))[:n]
    texts = [_fenced(p.answer) for p in problems]
    rows = {}
    t0 = time.monotonic()
    batch = task.score_batch(problems, texts)
    rows["batch, cold"] = (time.monotonic() - t0, sum(batch))
    t0 = time.monotonic()
    again = task.score_batch(problems, texts)
    rows["batch, warm"] = (time.monotonic() - t0, sum(again))
    t0 = time.monotonic()
    seq = [task.reward(p, t) for p, t in zip(problems, texts)]
    rows["sequential, warm"] = (time.monotonic() - t0, sum(seq))
    return {"n": len(problems), "max_parallel": max_parallel,
            "isolation": task.sandbox.isolation,
            "rows": {k: {"seconds": round(s, 2), "programs_per_s": round(len(problems) / s, 2),
                         "passed": int(p)} for k, (s, p) in rows.items()},
            "load": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="MbppPlus.jsonl")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--max-parallel", type=int, default=2)
    parser.add_argument("--label", default="after")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    result = {"label": args.label, **measure(args.data, args.n, args.max_parallel)}
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    result["rev"] = rev.stdout.strip()
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    json.dump(result, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
