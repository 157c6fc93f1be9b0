"""Sandbox throughput: programs per second for a trivial and an MBPP-sized program.

Run by bin/bench-sandbox-isolation (under `flock /work/heavy.lock`): N runs of
each program with `max_parallel` at once, through `Sandbox.run_many`; prints
one JSON line per program kind and, with --write, appends a section to
benchmarks/results/sandbox-isolation-cpu.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from rapid_async.tasks.sandbox import Limits, Sandbox

TRIVIAL = "print(1)\n"
MBPP_SIZED = '''import math
R = 3
C = 3
def min_cost(cost, m, n):
    tc = [[0 for x in range(C)] for x in range(R)]
    tc[0][0] = cost[0][0]
    for i in range(1, m+1):
        tc[i][0] = tc[i-1][0] + cost[i][0]
    for j in range(1, n+1):
        tc[0][j] = tc[0][j-1] + cost[0][j]
    for i in range(1, m+1):
        for j in range(1, n+1):
            tc[i][j] = min(tc[i-1][j-1], tc[i-1][j], tc[i][j-1]) + cost[i][j]
    return tc[m][n]
def is_not_prime(n):
    for i in range(2, int(math.sqrt(n)) + 1):
        if n % i == 0:
            return True
    return False
import heapq, collections, re
assert min_cost([[1, 2, 3], [4, 8, 2], [1, 5, 3]], 2, 2) == 8
assert min_cost([[2, 3, 4], [5, 9, 3], [2, 6, 4]], 2, 2) == 12
assert min_cost([[3, 4, 5], [6, 10, 4], [3, 7, 5]], 2, 2) == 16
assert is_not_prime(2) == False and is_not_prime(10) == True and is_not_prime(35) == True
assert heapq.nlargest(3, [25, 35, 22, 85, 14, 65, 75, 22, 58]) == [85, 75, 65]
assert collections.Counter("abca")["a"] == 2 and re.sub(r"a", "b", "aa") == "bb"
print("ok")
'''


def measure(box: Sandbox, code: str, runs: int) -> dict:
    """Programs per second over `runs` runs; every run must succeed."""
    t0 = time.monotonic()
    results = box.run_many([code] * runs)
    elapsed = time.monotonic() - t0
    failed = [r for r in results if r.returncode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} of {runs} runs failed: {failed[0].stderr[-500:]}")
    return {"runs": runs, "seconds": round(elapsed, 2), "programs_per_s": round(runs / elapsed, 2)}


def describe(box: Sandbox) -> str:
    report = getattr(box, "limits_enforced", None)
    return f"isolation {box.isolation}" + (f"; {report}" if report else " (before issue 15)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--max-parallel", type=int, default=2)
    parser.add_argument("--label", default="")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    box = Sandbox(Limits(wall_s=30, cpu_s=10), max_parallel=args.max_parallel)
    rows = {name: measure(box, code, args.runs) for name, code in
            (("trivial", TRIVIAL), ("mbpp-sized", MBPP_SIZED))}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(json.dumps({"label": args.label, "commit": commit, "mode": describe(box), **rows}))
    if args.write:
        out = Path("benchmarks/results/sandbox-isolation-cpu.md")
        lines = [] if out.exists() else [
            "# Sandbox throughput (issue 15)\n\n2-core dev box, loaded (other sessions running); "
            "`bin/bench-sandbox-isolation` under `flock /work/heavy.lock`, "
            f"{args.runs} runs per program, max_parallel {args.max_parallel}.\n\n"
            "| label | commit | mode | trivial programs/s | mbpp-sized programs/s |\n|---|---|---|---|---|\n"]
        lines.append(f"| {args.label} | {commit} | {describe(box)} | "
                     f"{rows['trivial']['programs_per_s']} | {rows['mbpp-sized']['programs_per_s']} |\n")
        with open(out, "a", encoding="utf-8") as f:
            f.writelines(lines)


if __name__ == "__main__":
    main()
