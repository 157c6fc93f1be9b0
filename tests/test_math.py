"""MATH task against the real data: last-boxed extraction, math-verify equivalence, time bound."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

from rapid_async.tasks.base import Problem
from rapid_async.tasks.math import MathTask, last_boxed

EXCEPTIONS = json.loads((Path(__file__).parent / "data" / "verifier_exceptions.json")
                        .read_text())["math"]


@pytest.fixture(scope="module")
def task(shared_data):
    t = MathTask(str(shared_data / "math" / "train.jsonl"), str(shared_data / "math" / "test.jsonl"))
    yield t
    t.close()


def perturb(answer: str) -> str:
    """A wrong answer: the first digit changed (d -> d+1 mod 10), else '+1' appended."""
    m = re.search(r"\d", answer)
    if m is None:
        return answer + "+1"
    i = m.start()
    return answer[:i] + str((int(answer[i]) + 1) % 10) + answer[i + 1:]


def check(task, problems):
    """Reference solutions must score 1, perturbed boxed answers 0 (>= 99%, listed exceptions)."""
    accept = [p.prompt_id for p in problems if task.reward(p, p.meta["solution"]) != 1.0]
    reject = [p.prompt_id for p in problems
              if task.reward(p, f"So the answer is \\boxed{{{perturb(p.answer)}}}.") != 0.0]
    assert set(accept) <= set(EXCEPTIONS["accept"]), set(accept) - set(EXCEPTIONS["accept"])
    assert set(reject) <= set(EXCEPTIONS["reject"]), set(reject) - set(EXCEPTIONS["reject"])
    assert len(accept) <= 0.01 * len(problems) and len(reject) <= 0.01 * len(problems)


def test_math500_references_accepted_and_perturbed_rejected(task):
    assert (task.train_size, task.heldout_size) == (12000, 500)
    check(task, task.heldout(500))


@pytest.mark.slow
@pytest.mark.full  # bin/test checks MATH-500 (test_math500_references_...)
def test_whole_train_split_references_accepted_and_perturbed_rejected(task):
    """12,000 records, about a minute on one core."""
    check(task, [task.train_problem(i) for i in range(task.train_size)])


@pytest.mark.parametrize("reference, text, expected", [
    ("\\frac{1}{2}", "\\boxed{0.5}", 1), ("0.5", "\\boxed{\\frac{1}{2}}", 1),
    ("\\frac{1}{2}", "\\boxed{\\dfrac12}", 1), ("\\frac{1}{2}", "\\boxed{1/2}", 1),
    ("\\frac{1}{2}", "\\boxed{0.6}", 0), ("\\frac{1}{2}", "the answer is 0.5", 0),
    ("1000000", "\\boxed{1,000,000}", 1), ("1000000", "\\boxed{1{,}000{,}000}", 1),
    ("1000000", "\\boxed{\\$1,000,000}", 1), ("1000000", "\\boxed{10^6}", 1),
    ("1000000", "\\boxed{1000001}", 0), ("5", "\\boxed{5\\text{ cm}}", 1),
    ("5", "\\boxed{5 \\text{ inches}^2}", 1), ("5", "\\boxed{6\\text{ cm}}", 0),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\pi/2)}", 1),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\pi)}", 0),
    ("x^2+2x+1", "\\boxed{(x+1)^2}", 1), ("[2,5)", "\\boxed{[2,5]}", 0),
    ("3", "\\boxed{2} no wait \\boxed{3}", 1), ("3", "\\boxed{3} no wait \\boxed{2}", 0),
])
def test_answers_written_the_way_models_write_them(task, reference, text, expected):
    assert task.reward(Problem("x", "q", reference), text) == expected


def test_last_boxed():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert last_boxed("so $\\boxed 9$.") == "9"
    assert last_boxed("\\boxed{x} then \\fbox{y}") == "y"
    assert last_boxed("\\boxed{unclosed") is None and last_boxed("no box") is None


def test_never_raises_and_bounds_time_in_threads(shared_data):
    """A pathological answer is cut off by the worker's timeout (reward 0), from
    several threads at once; the next call works again."""
    t = MathTask(str(shared_data / "math" / "train.jsonl"), str(shared_data / "math" / "test.jsonl"),
                 verify_timeout_s=1.0)
    try:
        p = Problem("x", "q", "2")
        slow = "\\boxed{(x+1)^{2000}}"  # about 11 s of sympy expansion on one core
        for junk in [None, "", "\\boxed{}", "\\boxed{" + "{" * 500, "\\boxed{\\frac{1}{0}}", "\x00"]:
            assert t.reward(p, junk) == 0.0
        results = []
        threads = [threading.Thread(target=lambda: results.append(t.reward(p, slow)))
                   for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
        assert results == [0.0, 0.0] and t.timeouts >= 1
        assert t.reward(p, "\\boxed{2}") == 1.0
    finally:
        t.close()
