"""Tests for held-out evaluation (greedy success rate and pass@k)."""

import pytest

from rapid_async.engines.base import Completion, GenerateRequest
from rapid_async.evaluate import evaluate, pass_at_k
from rapid_async.tasks.arithmetic import ArithmeticTask
from rapid_async.tinymodel import build_tokenizer


class ScriptedEngine:
    """A stand-in engine (the evaluator is under test, not the engine).

    Answers a prompt correctly on sample j when `rule(prompt_text, j)` is true,
    otherwise answers "x"; records every request it receives.
    """

    def __init__(self, tokenizer, task, rule):
        self.tokenizer, self.rule = tokenizer, rule
        self.answers = {p.prompt: p.answer for p in task.heldout(task.heldout_size)}
        self.requests: list[GenerateRequest] = []

    def generate(self, request):
        self.requests.append(request)
        groups = []
        for prompt in request.prompts:
            text = self.tokenizer.decode(prompt, skip_special_tokens=True)
            group = []
            for j in range(request.n):
                answer = self.answers[text] if self.rule(text, j) else "x"
                ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
                ids.append(self.tokenizer.eos_token_id)
                group.append(Completion(ids, [-0.1] * len(ids)))
            groups.append(group)
        return groups


@pytest.fixture()
def setup():
    return build_tokenizer(), ArithmeticTask(heldout_size=100)


def test_greedy_success_rate(setup):
    tokenizer, task = setup
    right = {p.prompt for p in task.heldout(100)[:37]}
    engine = ScriptedEngine(tokenizer, task, lambda text, j: text in right)
    assert evaluate(engine, tokenizer, task, n=100, batch_size=30) == pytest.approx(0.37)
    assert [len(r.prompts) for r in engine.requests] == [30, 30, 30, 10]
    assert all(r.temperature == 0.0 and r.n == 1 for r in engine.requests)


def test_pass_at_k(setup):
    tokenizer, task = setup
    problems = task.heldout(40)
    # first 10 problems: only sample 3 is right; next 10: all 4 right; the rest: none
    solved_once = {p.prompt for p in problems[:10]}
    solved_all = {p.prompt for p in problems[10:20]}
    engine = ScriptedEngine(tokenizer, task,
                            lambda text, j: text in solved_all or (text in solved_once and j == 3))
    result = pass_at_k(engine, tokenizer, task, k=4, n=40, temperature=1.0, seed=7)
    assert result["pass_at_k"] == pytest.approx(20 / 40)
    assert result["mean_reward"] == pytest.approx((10 * 1 + 10 * 4) / (40 * 4))
    assert engine.requests[0].n == 4 and engine.requests[0].seed == 7
