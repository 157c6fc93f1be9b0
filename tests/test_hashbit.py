"""Tests for rapid_async.tasks.hashbit: the benchmark-only hash-bit reward task."""

from __future__ import annotations

from rapid_async.tasks.base import get_task


def test_prompts_are_deterministic_digits_and_splits_are_disjoint():
    task = get_task("hashbit", digits=2, ops="+-", seed=3)  # the run config's options are accepted
    again = get_task("hashbit", seed=3)
    assert task.train_problem(5) == again.train_problem(5)
    assert task.train_problem(5) != task.train_problem(6)
    prompt = task.train_problem(0).prompt
    assert len(prompt) == 16 and prompt.isdigit()
    train = {task.train_problem(i).prompt_id for i in range(50)}
    assert train.isdisjoint(p.prompt_id for p in task.heldout(50))


def test_reward_is_a_bit_that_varies_with_the_completion_and_never_raises():
    task = get_task("hashbit")
    problem = task.train_problem(0)
    rewards = [task.reward(problem, f"<t{i}>") for i in range(64)]
    assert set(rewards) == {0.0, 1.0}  # about half and half
    assert 16 < sum(rewards) < 48
    assert task.reward(problem, "<t1>") == task.reward(problem, "<t1>")
    assert task.reward(problem, None) in (0.0, 1.0)
    assert task.reward(problem, "\udcff") in (0.0, 1.0)  # unencodable text
