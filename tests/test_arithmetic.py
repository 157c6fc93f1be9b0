"""Tests for the arithmetic task and the task registry."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rapid_async.tasks.arithmetic import ArithmeticTask
from rapid_async.tasks.base import Problem, get_task, known_tasks

PROMPT = re.compile(r"^(\d+)([+\-*])(\d+)=$")


def _check(problem: Problem, digits: int) -> None:
    """The prompt parses, operands fit the digit count, the answer is right."""
    match = PROMPT.match(problem.prompt)
    assert match, problem.prompt
    a, op, b = int(match[1]), match[2], int(match[3])
    assert 0 <= a < 10**digits and 0 <= b < 10**digits
    expected = {"+": a + b, "-": a - b, "*": a * b}[op]
    assert problem.answer == str(expected)
    assert problem.prompt_id == problem.prompt[:-1]


def test_default_problems_are_well_formed():
    task = ArithmeticTask()
    problems = [task.train_problem(i) for i in range(300)] + task.heldout(300)
    for problem in problems:
        _check(problem, digits=2)
    ops = {PROMPT.match(p.prompt)[2] for p in problems}
    assert ops == {"+", "-"}
    assert any(p.answer.startswith("-") for p in problems)


def test_example_format():
    problem = Problem("12+34", "12+34=", "46")
    task = ArithmeticTask()
    assert task.reward(problem, "46") == 1.0
    assert task.reward(problem, " 46\n") == 1.0
    assert task.reward(problem, "46<eos>junk") == 1.0
    assert task.reward(problem, "47") == 0.0


@pytest.mark.parametrize("digits,ops", [(1, "+"), (3, "*"), (2, "+-*"), (4, "-")])
def test_options(digits, ops):
    task = ArithmeticTask(digits=digits, ops=ops, heldout_size=40)
    problems = [task.train_problem(i) for i in range(100)] + task.heldout(40)
    for problem in problems:
        _check(problem, digits)
        assert PROMPT.match(problem.prompt)[2] in ops


def test_negative_answers_rewarded():
    task = ArithmeticTask()
    problem = Problem("12-34", "12-34=", "-22")
    assert task.reward(problem, "-22") == 1.0
    assert task.reward(problem, "22") == 0.0


HOSTILE = [
    None, "", " ", "\n\t", "<eos>46", "046", "+46", "46.0", "4 6", "46 46", "46=",
    "\u0664\u0666",  # Arabic-Indic digits 4 and 6: int() would accept them
    "\uff14\uff16",  # fullwidth 4 and 6
    "46\u200b",  # zero-width space is not whitespace
    "9" * 10_000, "-" * 100, "\x00", "\udc80", "NaN", "inf", "1e1", "0x2e",
    b"46", 46, 46.0, ["46"], object(),
]


@pytest.mark.parametrize("text", HOSTILE, ids=lambda t: repr(t)[:20])
def test_hostile_completions_score_zero(text):
    task = ArithmeticTask()
    assert task.reward(Problem("12+34", "12+34=", "46"), text) == 0.0


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_reward_never_raises_and_is_binary(text):
    task = ArithmeticTask()
    problem = task.train_problem(0)
    value = task.reward(problem, text)
    assert value in (0.0, 1.0)
    assert value == (1.0 if text.split("<eos>")[0].strip() == problem.answer else 0.0)


def test_train_and_heldout_are_disjoint():
    task = ArithmeticTask(heldout_size=500)
    heldout = {p.prompt for p in task.heldout(500)}
    assert len(heldout) == 500
    train = {task.train_problem(i).prompt for i in range(20_000)}
    assert not heldout & train
    # the rejection actually happened: the raw training streams do hit held-out problems
    assert len(train) > 7_000


def test_disjoint_on_a_small_space():
    """1-digit "+" has 100 problems; half are held out, training uses the rest only."""
    task = ArithmeticTask(digits=1, ops="+", heldout_size=50)
    heldout = {p.prompt for p in task.heldout(50)}
    train = {task.train_problem(i).prompt for i in range(2_000)}
    assert not heldout & train
    assert len(heldout | train) == 100


def test_deterministic_and_seed_dependent():
    a, b, c = ArithmeticTask(seed=0), ArithmeticTask(seed=0), ArithmeticTask(seed=1)
    assert [a.train_problem(i) for i in range(50)] == [b.train_problem(i) for i in range(50)]
    assert a.heldout(100) == b.heldout(100)
    assert a.heldout(100) != c.heldout(100)
    assert [a.train_problem(i) for i in range(50)] != [c.train_problem(i) for i in range(50)]
    # index order does not matter
    assert a.train_problem(7) == ArithmeticTask(seed=0).train_problem(7)
    assert a.heldout(10) == a.heldout(100)[:10]


@pytest.mark.parametrize(
    "kwargs,field",
    [({"digits": 0}, "digits"), ({"ops": "/"}, "ops"), ({"ops": ""}, "ops"),
     ({"ops": "++"}, "ops"), ({"digits": 1, "ops": "+", "heldout_size": 51}, "heldout_size")],
)
def test_bad_options(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ArithmeticTask(**kwargs)


def test_bad_indices():
    task = ArithmeticTask()
    with pytest.raises(ValueError, match="index"):
        task.train_problem(-1)
    with pytest.raises(ValueError, match="heldout_size"):
        task.heldout(501)


def test_registry():
    assert "arithmetic" in known_tasks()
    task = get_task("arithmetic", digits=3, ops="*", heldout_size=10)
    assert isinstance(task, ArithmeticTask) and task.digits == 3
    with pytest.raises(ValueError, match="known tasks: .*arithmetic"):
        get_task("nope")
    with pytest.raises(ValueError, match="arithmetic"):
        get_task("arithmetic", colour="red")
